// Device helpers shared by the CUDA kernels: int8 tensor-core MMA, async copies,
// block-planar decoding, float conversions.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels.cuh"

namespace pyclipq::cuda {

// D = A(16x32, s8, row) * B(32x8, s8, col) + C, s32 accumulate (sm_80+).
// Fragments (PTX ISA, mma.m16n8k32): with g = lane / 4 and t = lane % 4,
//   a0 = A[g][4t..4t+3], a1 = A[g+8][4t..], a2 = A[g][16+4t..], a3 = A[g+8][16+4t..]
//   b0 = B[4t..4t+3][g], b1 = B[16+4t..][g]
//   c0, c1 = C[g][2t, 2t+1], c2, c3 = C[g+8][2t, 2t+1]
// Only the pairing of A's and B's k matters to the sum, which lets the GEMV load 8
// consecutive bytes per lane (see gemv.cu).
__device__ __forceinline__ void mma_s8(int (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Bit-field p of each of the 4 bytes of a block-planar word, as 4 int8 codes in one
// register: the layout puts 4 consecutive K values of one field in the 4 bytes, so
// decoding is one shift and one AND (a single LOP3 with the mask), no byte permutes.
template <int BITS>
__device__ __forceinline__ uint32_t decode_field(uint32_t word, int p) {
  if constexpr (BITS == 8) {
    return word;
  } else {
    constexpr uint32_t kMask = BITS == 4 ? 0x0F0F0F0Fu : 0x03030303u;
    return (word >> (p * BITS)) & kMask;
  }
}

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool pred) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int src_bytes = pred ? 16 : 0;  // 0: zero-fill the destination, read nothing
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Four 8x8 b16 matrices: with 8-bit data, lane l gets bytes 4(l%4)..+3 of row l/4 of
// each, which is exactly the s8 A fragment of mma.m16n8k32 (a0..a3 in order when lanes
// 0-7, 8-15, 16-23, 24-31 address rows 0-7 / 8-15 at byte 0, then rows 0-7 / 8-15 at 16).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

__device__ __forceinline__ float load_as_float(const void* p, DType t, int64_t i) {
  switch (t) {
    case DType::BF16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    case DType::F16: return __half2float(static_cast<const __half*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

__device__ __forceinline__ void store_from_float(void* p, DType t, int64_t i, float v) {
  switch (t) {
    case DType::BF16: static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v); break;
    case DType::F16: static_cast<__half*>(p)[i] = __float2half_rn(v); break;
    default: static_cast<float*>(p)[i] = v; break;
  }
}

// level_mul * raw - level_offset * sum in wrapping 32-bit arithmetic: the reference
// computes it in int64 and wraps to int32, so this is equal for every input (no UB).
__device__ __forceinline__ int32_t offset_correct(int32_t raw, int level_mul, int level_offset, int32_t sum) {
  return static_cast<int32_t>(static_cast<uint32_t>(raw) * static_cast<uint32_t>(level_mul) -
                              static_cast<uint32_t>(level_offset) * static_cast<uint32_t>(sum));
}

}  // namespace pyclipq::cuda
