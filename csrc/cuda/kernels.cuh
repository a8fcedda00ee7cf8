// Launchers of pyclipq's CUDA kernels (torch-free: raw pointers and a stream).
// Each launcher launches exactly one kernel; the aten wrappers (ops_cuda.cu) call
// C10_CUDA_KERNEL_LAUNCH_CHECK() right after it.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "pyclipq/backend_limits.h"

namespace pyclipq::cuda {

// Element types of float tensors crossing the launchers (activations, bias, output).
enum class DType : int { None = 0, F32 = 1, BF16 = 2, F16 = 3, I32 = 4 };

struct QuantizeArgs {
  const void* x;               // [m, k] rows, row stride x_row_stride elements, unit column stride
  DType x_dtype;
  int64_t m, k, k_pad, x_row_stride;
  int group_size;              // 0 = one group per row
  const float* static_scale;   // nullptr = dynamic per-token scale
  int8_t* q;                   // [m, k_pad]
  float* scale;                // [m]
  int32_t* sums;               // [m, groups]
};
void launch_quantize(const QuantizeArgs& a, cudaStream_t stream);

// One integer GEMM with the optional fused epilogue of docs/FORMATS.md:
//   acc[m, n, g] = level_mul * sum_{k in g} c[n, k] q[m, k] - level_offset * sums[m, g]
//   out_dtype I32: out[m, n, g] = acc (exact)
//   otherwise:     out[m, n] = (sum_g w_scale[n, g] * acc[m, n, g]) * s[m] + bias[n]
struct GemmArgs {
  const int8_t* a;        // [m, k_pad]
  const uint8_t* w;       // int8 [n, k_pad] or block-planar packed [n, k_pad * bits / 8]
  const int32_t* sums;    // [m, groups]; unused when level_offset == 0
  const float* s;         // [m] activation scales (fused only)
  const float* w_scale;   // [n, groups] (fused only)
  const void* bias;       // [n] or nullptr
  DType bias_dtype;
  void* out;
  DType out_dtype;
  int m, n, k_pad, groups;
  int group_steps;        // group size in 32-element steps (k_pad / 32 for one group per row)
  int bits, level_mul, level_offset;
};
void launch_gemm(const GemmArgs& a, cudaStream_t stream);
// M <= kGemvMaxM (pyclipq/backend_limits.h), fused epilogue only: memory-bound weight
// streaming with K split across warps.
using pyclipq::kGemvMaxM;
void launch_gemv(const GemmArgs& a, cudaStream_t stream);

void launch_pack_codes(const uint8_t* codes, uint8_t* out, int64_t n, int64_t k_pad, int bits, cudaStream_t stream);
void launch_unpack_codes(const uint8_t* packed, uint8_t* out, int64_t n, int64_t k_pad, int bits,
                         cudaStream_t stream);
void launch_pack_trits(const uint8_t* codes, uint8_t* out, int64_t n, int64_t width, int64_t k, int pad_code,
                       cudaStream_t stream);
void launch_unpack_trits(const uint8_t* packed, uint8_t* out, int64_t n, int64_t k, int64_t k_pad, int pad_code,
                         cudaStream_t stream);

}  // namespace pyclipq::cuda
