// Torch-free CPU kernel interface. One table per ISA variant (scalar, avx2, ...);
// csrc/cpu/isa.cpp picks one at run time. The aten wrappers in ops_cpu.cpp do the
// argument checks, allocation and threading, and call these on tiles.
#pragma once
#include <cstdint>

#include "pyclipq/formats.h"

namespace pyclipq::cpu {

// Quantize `rows` rows of fp32 x (row stride ldx, K valid columns) to int8 [rows, k_pad].
// static_scale == nullptr: dynamic per-token scale. Writes scale[rows] and the group
// sums sums[rows, G]. Returns the index of the first row holding NaN/Inf, or -1.
using QuantizeRowsFn = int64_t (*)(const float* x, int64_t ldx, int64_t rows, int64_t k, int64_t k_pad,
                                   int64_t group_size, const float* static_scale, int8_t* q, float* scale,
                                   int32_t* sums);

// Integer GEMM tile: out[m, n, g] = sum_{k in g} level(w[n, k]) * x_q[m, k] for all m < M and
// n0 <= n < n1 (exact int32). out has row stride N * G. x_sums[M, G] are the group sums of x_q.
using GemmFn = void (*)(WeightKind kind, const int8_t* x_q, const int32_t* x_sums, int64_t M, int64_t k_pad,
                        int64_t group_size, const void* weight, int64_t n0, int64_t n1, int64_t N, int32_t* out);

// Fused linear tile (after activation quantization):
// y[m, n] = x_scale[m] * sum_g w_scale[n, g] * acc[m, n, g] + bias[n], for n0 <= n < n1, fp32 out
// with row stride N. bias may be nullptr.
using LinearFn = void (*)(WeightKind kind, const int8_t* x_q, const float* x_scale, const int32_t* x_sums,
                          int64_t M, int64_t k_pad, int64_t group_size, const void* weight, const float* w_scale,
                          const float* bias, int64_t n0, int64_t n1, int64_t N, float* y);

struct KernelTable {
  const char* isa;
  QuantizeRowsFn quantize_rows;
  GemmFn gemm;
  LinearFn linear;
};

const KernelTable& scalar_kernels();
#if defined(__x86_64__) || defined(_M_X64)
const KernelTable& avx2_kernels();
#endif

// The table chosen at run time (CPUID, overridable with PYCLIPQ_CPU_ISA=scalar|avx2).
const KernelTable& active_kernels();
const char* cpu_isa_reason();

}  // namespace pyclipq::cpu
