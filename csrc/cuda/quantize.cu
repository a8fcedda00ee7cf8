// Per-token symmetric int8 activation quantization with group sums (docs/FORMATS.md).
// Bit-exact with the reference: IEEE divisions (__fdiv_rn, whatever --use_fast_math
// says), one fp32 multiply, clamp, then round-half-even (__float2int_rn).
#include <cfloat>

#include "device_utils.cuh"
#include "pyclipq/formats.h"

namespace pyclipq::cuda {
namespace {

constexpr int kThreads = 256;
constexpr float kQmax = static_cast<float>(kActQmax);

template <typename T>
__device__ __forceinline__ float to_float(T v) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) return __bfloat162float(v);
  else if constexpr (std::is_same_v<T, __half>) return __half2float(v);
  else return v;
}

template <typename T>
__device__ __forceinline__ T block_reduce(T v, T (*op)(T, T), T* scratch) {
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = scratch[0];
  for (int w = 1; w < kThreads / 32; ++w) v = op(v, scratch[w]);
  __syncthreads();  // scratch may be reused right after
  return v;
}

__device__ float fmax_op(float a, float b) { return fmaxf(a, b); }
__device__ int or_op(int a, int b) { return a | b; }
__device__ int add_op(int a, int b) { return a + b; }

// One block per row: pass 1 finds |x|max (the row stays in L1/L2 for pass 2), pass 2
// writes 4 codes per thread as one 32-bit store and adds their sum to its group.
template <typename T>
__global__ void __launch_bounds__(kThreads) quantize_kernel(QuantizeArgs a) {
  extern __shared__ int32_t group_sums[];
  __shared__ float fscratch[kThreads / 32];
  __shared__ int iscratch[kThreads / 32];
  const int64_t row = blockIdx.x;
  const T* x = static_cast<const T*>(a.x) + row * a.x_row_stride;
  const int groups = a.group_size == 0 ? 1 : static_cast<int>(a.k_pad / a.group_size);
  for (int g = threadIdx.x; g < groups; g += kThreads) group_sums[g] = 0;

  float inv, scale;
  if (a.static_scale != nullptr) {
    scale = *a.static_scale;
    inv = __fdiv_rn(1.0f, scale);
  } else {
    float amax = 0.0f;
    int bad = 0;
    for (int64_t k = threadIdx.x; k < a.k; k += kThreads) {
      const float v = fabsf(to_float(x[k]));
      amax = fmaxf(amax, v);     // fmaxf drops NaN, hence the separate flag
      bad |= !(v <= FLT_MAX);
    }
    amax = block_reduce(amax, fmax_op, fscratch);
    bad = block_reduce(bad, or_op, iscratch);
    inv = amax >= kActMinAbsmax ? __fdiv_rn(kQmax, amax) : 0.0f;
    scale = bad ? __int_as_float(0x7fc00000) : __fdiv_rn(amax, kQmax);  // NaN marks a non-finite row
  }
  __syncthreads();  // group_sums zeroed

  int8_t* q = a.q + row * a.k_pad;
  int total = 0;
  for (int64_t c = threadIdx.x * 4; c < a.k_pad; c += kThreads * 4) {
    int packed = 0, sum4 = 0;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float v = c + j < a.k ? to_float(x[c + j]) : 0.0f;
      const int qv = __float2int_rn(fminf(fmaxf(v * inv, -kQmax), kQmax));
      packed |= (qv & 0xff) << (8 * j);
      sum4 += qv;
    }
    *reinterpret_cast<int*>(q + c) = packed;  // k_pad is a multiple of 128: aligned
    if (a.group_size == 0) total += sum4;
    else atomicAdd(&group_sums[c / a.group_size], sum4);  // 4 columns never straddle a group (>= 32)
  }
  if (a.group_size == 0) {
    total = block_reduce(total, add_op, iscratch);
    if (threadIdx.x == 0) a.sums[row] = total;
  } else {
    __syncthreads();
    for (int g = threadIdx.x; g < groups; g += kThreads) a.sums[row * groups + g] = group_sums[g];
  }
  if (threadIdx.x == 0) a.scale[row] = scale;
}

}  // namespace

void launch_quantize(const QuantizeArgs& a, cudaStream_t stream) {
  if (a.m == 0) return;
  const int groups = a.group_size == 0 ? 1 : static_cast<int>(a.k_pad / a.group_size);
  const size_t smem = sizeof(int32_t) * groups;
  const dim3 grid(static_cast<unsigned>(a.m));
  switch (a.x_dtype) {
    case DType::BF16: quantize_kernel<__nv_bfloat16><<<grid, kThreads, smem, stream>>>(a); break;
    case DType::F16: quantize_kernel<__half><<<grid, kThreads, smem, stream>>>(a); break;
    default: quantize_kernel<float><<<grid, kThreads, smem, stream>>>(a); break;
  }
}

}  // namespace pyclipq::cuda
