// AVX-512 helpers shared by the tables built on them: the VNNI table (kernels_avx512_vnni.cpp)
// and the AMX table (kernels_amx.cpp), whose epilogues and canonical-layout repacks are AVX-512.
// Include only from a translation unit compiled with at least -mavx512f -mavx512bw -mavx512vl
// -mavx512dq. Like kernels_portable.h, everything has internal linkage, so each table keeps its
// own copy compiled with its own flags (no ODR merging across ISA flags).
#pragma once
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "pyclipq/cpu_kernels.h"

namespace pyclipq::cpu {
namespace {

#define PQ_INLINE inline __attribute__((always_inline))

PQ_INLINE __mmask16 first_lanes16(int64_t n) { return n >= 16 ? __mmask16(0xffff) : __mmask16((1u << n) - 1); }

// ------------------------------------------------------------------ weight operands

// How a weight enters the integer multiply: the operand is level + O. A u8 x s8 product
// (vpdpbusd) needs every operand unsigned: O = 128 for int8 (the sign bit flipped). An s8 x s8
// product (AMX tdpbssd) takes int8 weights as they are: O = 0. The low-bit formats' operand is
// level_mul * code either way (O = level_offset; at most 15, so it fits both).
enum class Operand { U8, S8 };

template <Operand OP = Operand::U8>
constexpr int operand_offset(WeightKind kind) {
  return kind == WeightKind::Int8 ? (OP == Operand::U8 ? 128 : 0) : traits(kind).level_offset;
}

// The operands of the 64 weights [128 s + 64 H, 128 s + 64 H + 64) of one canonical row: chunk
// 2s + H of the row's 64-element chunks.
template <WeightKind KIND, int H, Operand OP = Operand::U8>
PQ_INLINE __m512i operands64(const uint8_t* row, int64_t s) {
  if constexpr (KIND == WeightKind::Int8) {
    const __m512i w = _mm512_loadu_si512(row + 128 * s + 64 * H);
    if constexpr (OP == Operand::S8) return w;
    else return _mm512_xor_si512(w, _mm512_set1_epi8(static_cast<char>(0x80)));
  } else {
    constexpr int BITS = traits(KIND).bits;
    constexpr int PAIRS = (8 / BITS) / 2;  // plane pairs per 32-byte unit: int4 1, int2/ternary 2
    constexpr int PAIR = (H % PAIRS);
    // the unit holding chunk 2s + H, broadcast to both halves; planes 2 PAIR and 2 PAIR + 1 are
    // 64 consecutive elements, shifted down in the low and high 256 bits respectively
    const uint8_t* unit = PAIRS == 2 ? row + 32 * s : row + 64 * s + 32 * H;  // (2 s + H) / PAIRS units in
    const __m512i v = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(unit)));
    const __m512i shift =
        _mm512_inserti64x4(_mm512_set1_epi16(2 * PAIR * BITS), _mm256_set1_epi16((2 * PAIR + 1) * BITS), 1);
    const __m512i code = _mm512_and_si512(_mm512_srlv_epi16(v, shift), _mm512_set1_epi8((1 << BITS) - 1));
    if constexpr (traits(KIND).level_mul == 2) return _mm512_add_epi8(code, code);
    else return code;
  }
}

// v[r] holds 16 dwords of row r; afterwards v[d] holds dword d of rows 0..15.
PQ_INLINE void transpose16x16_epi32(__m512i (&v)[16]) {
  __m512i t[16];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(v[2 * i], v[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(v[2 * i], v[2 * i + 1]);
  }
  // u[4 i + e], 128-bit lane L: dword 4 L + e of rows 4 i .. 4 i + 3
  __m512i u[16];
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
    u[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  // a 4 x 4 transpose of 128-bit lanes across u[e], u[4 + e], u[8 + e], u[12 + e]
#pragma GCC unroll 4
  for (int e = 0; e < 4; ++e) {
    const __m512i s0 = _mm512_shuffle_i32x4(u[e], u[4 + e], _MM_SHUFFLE(1, 0, 1, 0));
    const __m512i s1 = _mm512_shuffle_i32x4(u[e], u[4 + e], _MM_SHUFFLE(3, 2, 3, 2));
    const __m512i s2 = _mm512_shuffle_i32x4(u[8 + e], u[12 + e], _MM_SHUFFLE(1, 0, 1, 0));
    const __m512i s3 = _mm512_shuffle_i32x4(u[8 + e], u[12 + e], _MM_SHUFFLE(3, 2, 3, 2));
    v[e] = _mm512_shuffle_i32x4(s0, s2, _MM_SHUFFLE(2, 0, 2, 0));
    v[4 + e] = _mm512_shuffle_i32x4(s0, s2, _MM_SHUFFLE(3, 1, 3, 1));
    v[8 + e] = _mm512_shuffle_i32x4(s1, s3, _MM_SHUFFLE(2, 0, 2, 0));
    v[12 + e] = _mm512_shuffle_i32x4(s1, s3, _MM_SHUFFLE(3, 1, 3, 1));
  }
}

// ------------------------------------------------------------------ float outputs

// Float outputs, 16 columns at a time, written with the same rounding rules as store_float.
template <FloatType T>
PQ_INLINE void store16_as(void* y, int64_t i, __m512 v, __mmask16 m) {
  if constexpr (T == FloatType::F32) {
    _mm512_mask_storeu_ps(static_cast<float*>(y) + i, m, v);
  } else if constexpr (T == FloatType::BF16) {  // round half to even, quiet NaN: float_to_bf16
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb)), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
    _mm256_mask_storeu_epi16(static_cast<uint16_t*>(y) + i, m, _mm512_cvtepi32_epi16(r));
  } else {  // vcvtps2ph rounds half to even and overflows to infinity, like float_to_half
    _mm256_mask_storeu_epi16(static_cast<uint16_t*>(y) + i, m,
                             _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
}

PQ_INLINE void store16(void* y, FloatType t, int64_t i, __m512 v, __mmask16 m) {
  if (t == FloatType::F32) store16_as<FloatType::F32>(y, i, v, m);
  else if (t == FloatType::BF16) store16_as<FloatType::BF16>(y, i, v, m);
  else store16_as<FloatType::F16>(y, i, v, m);
}

// ------------------------------------------------------------------ canonical layout -> VNNI-4 panels

// Repacks the columns [b0, b1) into operands [panel][K / 4][16 columns][4] (the last panel's
// missing columns repeat the last column; they are never stored). This is the VNNI-4 order that
// both a vpdpbusd broadcast tile and an AMX B tile (16 K-quads x 16 columns) read.
template <WeightKind KIND, int H, Operand OP>
PQ_INLINE void repack_chunk(const uint8_t* const (&rows)[16], int64_t s, uint8_t* dst) {
  __m512i v[16];
#pragma GCC unroll 16
  for (int j = 0; j < 16; ++j) v[j] = operands64<KIND, H, OP>(rows[j], s);
  transpose16x16_epi32(v);
#pragma GCC unroll 16
  for (int d = 0; d < 16; ++d) _mm512_store_si512(dst + 64 * d, v[d]);
}

// Panels of weight rows prefetched ahead of the one being repacked. A panel's 16 rows are one
// contiguous run of memory, but the repack reads them as 16 interleaved short streams that the
// hardware prefetchers do not follow: cold (from DRAM), the repack waited on every line.
constexpr int64_t kRepackPrefetchPanels = 3;

template <WeightKind KIND, Operand OP = Operand::U8>
void repack_block(const uint8_t* w, int64_t ldw, int64_t b0, int64_t b1, int64_t k_pad, uint8_t* out) {
  const char* bytes = reinterpret_cast<const char*>(w);
  const int64_t end = b1 * ldw;  // prefetch no further than the block
  auto prefetch_panel = [&](int64_t n) {
    for (int64_t off = n * ldw; off < std::min(end, (n + 16) * ldw); off += 64) _mm_prefetch(bytes + off, _MM_HINT_T0);
  };
  for (int64_t i = 0; i < kRepackPrefetchPanels; ++i) prefetch_panel(b0 + 16 * i);
  for (int64_t n = b0; n < b1; n += 16) {
    prefetch_panel(n + 16 * kRepackPrefetchPanels);
    const uint8_t* rows[16];
    for (int j = 0; j < 16; ++j) rows[j] = w + std::min(n + j, b1 - 1) * ldw;
    uint8_t* dst = out + (n - b0) * k_pad;  // a panel is 16 * K bytes
    for (int64_t s = 0; s < k_pad / 128; ++s) {  // chunk c = 2 s + H holds K-quads 16 c .. 16 c + 15
      repack_chunk<KIND, 0, OP>(rows, s, dst + (2 * s) * 1024);
      repack_chunk<KIND, 1, OP>(rows, s, dst + (2 * s + 1) * 1024);
    }
  }
}

}  // namespace
}  // namespace pyclipq::cpu
