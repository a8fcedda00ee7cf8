// The AVX2 + FMA kernel table. Compiled with -mavx2 -mfma -mf16c (see CMakeLists.txt) and
// only selected when CPUID reports AVX2 and FMA.
//
// Shape of every integer kernel (measured on Zen 3, where vpmaddubsw / vpmaddwd issue
// 2 per cycle, vpsignb competes with them, vphaddd issues 1 per 2 cycles and vinserti128 /
// vperm2i128 1 per cycle):
//
// * Column pairs. A weight vector holds 16 consecutive K-elements of output column n in its
//   low 128-bit half and the same 16 elements of column n+1 in its high half; the activation
//   vector is the 16 activations broadcast to both halves (vbroadcasti128 from memory is a pure
//   load). Each accumulator then holds two outputs, one per half, and the exact per-group
//   horizontal sums never cross the 128-bit halves (reduce_halves: 6 shuffles/adds per 8
//   outputs). The weights are read in their canonical block-planar layout: a 16-byte slice of
//   a block is 16 consecutive elements in every bit plane (docs/FORMATS.md), so no repack.
// * Low-bit codes are the unsigned operand of vpmaddubsw and int8 activations the signed one;
//   level_offset * (group sum of x) is subtracted after the exact integer reduction.
// * Products are added in int16 for as many steps as the code range allows (bounds below),
//   then widened with vpmaddwd, which also applies level_mul.
// * int8 x int8 widens both sides to int16 and uses vpmaddwd: two multiply-unit instructions
//   per 32 multiply-adds and no vpsignb, exact for the full [-127, 127] range. The weights are
//   widened with vpmaddubsw against 0/1 selectors, once per register tile.
// * Register tiles reuse each unpacked weight vector across R activation rows. A tile's float
//   epilogue runs the same instruction sequence per output whatever the tile shape, so results
//   do not depend on how the (M, N) range was split across threads.
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "kernels_portable.h"

namespace pyclipq::cpu {
namespace {

// Integer adds are associative, so GCC is free to regroup a fully unrolled block of
// acc += maddubs(...) into "all products first, then a sum tree", which needs far more than 16
// registers and spills every product. An empty asm that claims to modify the accumulator pins
// the order: each product is added as soon as it is made.
inline __attribute__((always_inline)) void keep_order(__m256i& v) { asm("" : "+x"(v)); }

// ------------------------------------------------------------------ activation quantization

template <FloatType T>
inline __m256 load8(const void* base, int64_t i) {
  if constexpr (T == FloatType::F32) {
    return _mm256_loadu_ps(static_cast<const float*>(base) + i);
  } else {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(base) + i));
    if constexpr (T == FloatType::BF16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    return _mm256_cvtph_ps(h);
  }
}

inline float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}

inline int32_t hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  return _mm_cvtsi128_si32(s);
}

// round(v * inv) clamped to [-127, 127]. Clamping before the conversion equals clamping after
// rounding (the bounds are integers) and keeps huge static-scale values from wrapping.
inline __m256i quantize8(__m256 v, __m256 inv) {
  __m256 t = _mm256_mul_ps(v, inv);
  t = _mm256_min_ps(_mm256_max_ps(t, _mm256_set1_ps(-127.0f)), _mm256_set1_ps(127.0f));
  return _mm256_cvtps_epi32(t);  // MXCSR default: round half to even, like nearbyintf
}

template <FloatType T>
int64_t quantize_rows_t(const void* x, int64_t ldx, int64_t rows, int64_t k, int64_t k_pad, int64_t group_size,
                        const float* static_scale, int8_t* q, float* scale, int32_t* sums) {
  const int64_t groups = num_groups(k_pad, group_size);
  const int64_t glen = k_pad / groups;  // a multiple of 32
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256 fmax = _mm256_set1_ps(std::numeric_limits<float>::max());
  const __m256i unshuffle = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  const int64_t k8 = k / 8 * 8;
  int64_t bad_row = -1;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t row0 = r * ldx;
    __m256 vmax = _mm256_setzero_ps(), vbad = _mm256_setzero_ps();
    for (int64_t i = 0; i < k8; i += 8) {
      const __m256 a = _mm256_and_ps(load8<T>(x, row0 + i), absmask);
      vmax = _mm256_max_ps(vmax, a);
      vbad = _mm256_or_ps(vbad, _mm256_cmp_ps(a, fmax, _CMP_NLE_UQ));  // NaN or Inf
    }
    float amax = hmax(vmax);
    bool finite = _mm256_movemask_ps(vbad) == 0;
    for (int64_t i = k8; i < k; ++i) {
      const float a = std::fabs(load_float(x, T, row0 + i));
      finite &= a <= std::numeric_limits<float>::max();
      amax = a > amax ? a : amax;
    }
    if (!finite && bad_row < 0) bad_row = r;
    const RowScale rs = row_scale(amax, static_scale);
    scale[r] = rs.scale;
    const __m256 inv = _mm256_set1_ps(rs.inv);
    int8_t* qr = q + r * k_pad;
    int32_t* sr = sums + r * groups;
    // group by group: a group-end test per step (`%`, a 64-bit division) cost more than the step
    for (int64_t g = 0; g < groups; ++g) {
      __m256i gsum = _mm256_setzero_si256();
      for (int64_t c = g * glen; c < (g + 1) * glen; c += 32) {
        __m256i v[4];
        if (c + 32 <= k) {
          for (int j = 0; j < 4; ++j) v[j] = quantize8(load8<T>(x, row0 + c + 8 * j), inv);
        } else if (c < k) {  // the ragged end of the row: zero-padded copy
          alignas(32) float tail[32] = {};
          for (int64_t i = c; i < k; ++i) tail[i - c] = load_float(x, T, row0 + i);
          for (int j = 0; j < 4; ++j) v[j] = quantize8(_mm256_load_ps(tail + 8 * j), inv);
        } else {
          for (int j = 0; j < 4; ++j) v[j] = _mm256_setzero_si256();
        }
        gsum = _mm256_add_epi32(gsum, _mm256_add_epi32(_mm256_add_epi32(v[0], v[1]), _mm256_add_epi32(v[2], v[3])));
        // packs interleave the 128-bit halves; the dword permute restores element order
        const __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]), _mm256_packs_epi32(v[2], v[3]));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(qr + c), _mm256_permutevar8x32_epi32(b, unshuffle));
      }
      sr[g] = hsum_epi32(gsum);
    }
  }
  return bad_row;
}

int64_t avx2_quantize_rows(const void* x, FloatType x_type, int64_t ldx, int64_t rows, int64_t k, int64_t k_pad,
                           int64_t group_size, const float* static_scale, int8_t* q, float* scale, int32_t* sums) {
  return with_float_type(x_type, [&](auto t) {
    return quantize_rows_t<decltype(t)::value>(x, ldx, rows, k, k_pad, group_size, static_scale, q, scale, sums);
  });
}

// ------------------------------------------------------------------ tile layouts

#define PQ_INLINE inline __attribute__((always_inline))

PQ_INLINE __m256i load32(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }

PQ_INLINE __m256i broadcast16(const void* p) {
  return _mm256_broadcastsi128_si256(_mm_loadu_si128(static_cast<const __m128i*>(p)));
}

// a[i] holds int32 partial sums of two outputs, lanes 0-3 for one and 4-7 for the other.
// Lane i of the result is the total of a[i]'s low half and lane 4+i the total of its high half.
PQ_INLINE __m256i reduce_halves(__m256i a0, __m256i a1, __m256i a2, __m256i a3) {
  const __m256i s01 = _mm256_add_epi32(_mm256_unpacklo_epi32(a0, a1), _mm256_unpackhi_epi32(a0, a1));
  const __m256i s23 = _mm256_add_epi32(_mm256_unpacklo_epi32(a2, a3), _mm256_unpackhi_epi32(a2, a3));
  return _mm256_add_epi32(_mm256_unpacklo_epi64(s01, s23), _mm256_unpackhi_epi64(s01, s23));
}

// Row-paired tile: NQ pairs of activation rows x C weight columns, 8 accumulators. The
// activation vector holds 16 K-elements of row 2q in its low half and the same 16 of row
// 2q+1 in its high half, read straight from a packed tile as a memory operand; the weight
// vector is 16 bytes of column c broadcast to both halves, unpacked once and reused by all NQ
// pairs. Accumulator a = c * NQ + q; its halves are outputs (2q, c) and (2q + 1, c), so
// exact totals never need a cross-half shuffle. Two output vectors: lane l of vector v is
// accumulator 4v + l % 4, low half for l < 4.
template <int NQ, int C>
struct PairTile {
  static_assert(NQ * C == 8, "8 accumulators: the most that leave room for operands in 16 registers");
  static constexpr int kAcc = 8, kVecs = 2, kRows = 2 * NQ, kCols = C;
  static constexpr int row(int v, int l) { return 2 * ((4 * v + l % 4) % NQ) + l / 4; }
  static constexpr int col(int v, int l) { return (4 * v + l % 4) / NQ; }
  static constexpr bool kOneColPerVec = NQ == 4;
  PQ_INLINE static void totals(const __m256i (&a)[8], __m256i (&tot)[2]) {
    tot[0] = reduce_halves(a[0], a[1], a[2], a[3]);
    tot[1] = reduce_halves(a[4], a[5], a[6], a[7]);
  }
};

// One activation row x 8 weight columns, all in the canonical layout (32 consecutive
// K-elements per vector, activations as memory operands). Accumulator c holds column c in
// both halves; one output vector with lane l = column l. For M = 1 and an odd last row.
struct RowTile {
  static constexpr int kAcc = 8, kVecs = 1, kRows = 1, kCols = 8;
  static constexpr int row(int, int) { return 0; }
  static constexpr int col(int, int l) { return l; }
  static constexpr bool kOneColPerVec = false;
  PQ_INLINE static void totals(const __m256i (&a)[8], __m256i (&tot)[1]) {
    const __m256i lo = reduce_halves(a[0], a[1], a[2], a[3]), hi = reduce_halves(a[4], a[5], a[6], a[7]);
    tot[0] = _mm256_add_epi32(_mm256_permute2x128_si256(lo, hi, 0x20), _mm256_permute2x128_si256(lo, hi, 0x31));
  }
};

// Activations of one row tile, packed once per row tile (and reused by every column tile):
// [16-element chunk][row pair][row 2q: 16 bytes | row 2q+1: 16 bytes].
void pack_pair_tile(const int8_t* x, int64_t ldx, int nq, int64_t k_pad, int8_t* out) {
  for (int64_t t = 0; t < k_pad / 16; ++t)
    for (int q = 0; q < nq; ++q) {
      std::memcpy(out + (t * nq + q) * 32, x + 2 * q * ldx + 16 * t, 16);
      std::memcpy(out + (t * nq + q) * 32 + 16, x + (2 * q + 1) * ldx + 16 * t, 16);
    }
}

// int8 widened to int16 for vpmaddwd. 16-bit lane i of a load holds elements 2i (low byte)
// and 2i+1 (high byte); shifts sign-extend each.
PQ_INLINE __m128i even_epi16(__m128i v) { return _mm_srai_epi16(_mm_slli_epi16(v, 8), 8); }
PQ_INLINE __m128i odd_epi16(__m128i v) { return _mm_srai_epi16(v, 8); }
PQ_INLINE __m256i even_epi16(__m256i v) { return _mm256_srai_epi16(_mm256_slli_epi16(v, 8), 8); }
PQ_INLINE __m256i odd_epi16(__m256i v) { return _mm256_srai_epi16(v, 8); }

// Pair layout: [16-element chunk][row pair][even: 8 of row 2q | 8 of row 2q+1][odd: same].
void widen_pair_tile(const int8_t* x, int64_t ldx, int nq, int64_t k_pad, int16_t* out) {
  for (int64_t t = 0; t < k_pad / 16; ++t)
    for (int q = 0; q < nq; ++q) {
      const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x + 2 * q * ldx + 16 * t));
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x + (2 * q + 1) * ldx + 16 * t));
      __m128i* o = reinterpret_cast<__m128i*>(out + (t * nq + q) * 32);
      _mm_storeu_si128(o, even_epi16(a));
      _mm_storeu_si128(o + 1, even_epi16(b));
      _mm_storeu_si128(o + 2, odd_epi16(a));
      _mm_storeu_si128(o + 3, odd_epi16(b));
    }
}

// Row layout: [32-element chunk][even: 16 | odd: 16].
void widen_row(const int8_t* x, int64_t k_pad, int16_t* out) {
  for (int64_t t = 0; t < k_pad / 32; ++t) {
    const __m256i v = load32(x + 32 * t);
    __m256i* o = reinterpret_cast<__m256i*>(out + t * 32);
    _mm256_storeu_si256(o, even_epi16(v));
    _mm256_storeu_si256(o + 1, odd_epi16(v));
  }
}

// ------------------------------------------------------------------ lanes and sinks

// Per-row-tile constants in output-lane order, computed once per row tile.
struct RowConsts {
  int64_t m0 = 0;
  int rows = 0;
  std::vector<int32_t> offs;  // [G][vecs][8]: level_offset * x_sums[row, g]
  std::vector<float> xscale;  // [vecs][8]
};

template <class T>
void fill_row_consts(const GemmProblem& p, const LinearEpilogue* e, int64_t m0, RowConsts& rc) {
  const int64_t G = num_groups(p.k_pad, p.group_size);
  const int off = p.kind == WeightKind::Int8 ? 0 : traits(p.kind).level_offset;
  rc.m0 = m0;
  rc.rows = T::kRows;
  rc.offs.assign(G * T::kVecs * 8, 0);
  rc.xscale.assign(T::kVecs * 8, 0.0f);
  for (int v = 0; v < T::kVecs; ++v)
    for (int l = 0; l < 8; ++l) {
      const int64_t m = m0 + T::row(v, l);
      if (off != 0)
        for (int64_t g = 0; g < G; ++g) rc.offs[(g * T::kVecs + v) * 8 + l] = off * p.x_sums[m * G + g];
      if (e) rc.xscale[v * 8 + l] = e->x_scale[m];
    }
}

// base[col * stride] for the column of each lane of output vector v (columns clamped to the
// last valid one, whose lanes are never stored).
template <class T>
PQ_INLINE __m256 col_lanes(const float* base, int64_t stride, int64_t n0, int valid, int v) {
  if constexpr (T::kOneColPerVec) {
    return _mm256_broadcast_ss(base + (n0 + std::min(T::col(v, 0), valid - 1)) * stride);
  } else {
    if (T::col(0, 4) == 4 && valid == 8 && stride == 1) return _mm256_loadu_ps(base + n0);  // RowTile, per channel
    alignas(32) float t[8];
    for (int l = 0; l < 8; ++l) t[l] = base[(n0 + std::min(T::col(v, l), valid - 1)) * stride];
    return _mm256_load_ps(t);
  }
}

// The fused linear's epilogue: facc += float(total - offset) * w_scale per group, then
// y = fma(facc, x_scale, bias). Exact integer totals go into the float math, so the float
// error is that of G + 2 roundings (tests/helpers.linear_tolerance allows G + 4).
template <class T>
struct LinearSink {
  const LinearEpilogue& e;
  const RowConsts& rc;
  int64_t N, G, n0;
  int valid;

  PQ_INLINE void group(int64_t g, const __m256i (&tot)[T::kVecs], __m256 (&facc)[T::kVecs]) const {
#pragma GCC unroll 2
    for (int v = 0; v < T::kVecs; ++v) {
      const __m256i offs = load32(rc.offs.data() + (g * T::kVecs + v) * 8);
      const __m256 f = _mm256_cvtepi32_ps(_mm256_sub_epi32(tot[v], offs));
      facc[v] = _mm256_fmadd_ps(f, col_lanes<T>(e.w_scale + g, G, n0, valid, v), facc[v]);
    }
  }

  void finish(const __m256 (&facc)[T::kVecs]) const {
    __m256 y[T::kVecs];
#pragma GCC unroll 2
    for (int v = 0; v < T::kVecs; ++v) {
      const __m256 bias = e.bias ? col_lanes<T>(e.bias, 1, n0, valid, v) : _mm256_setzero_ps();
      y[v] = _mm256_fmadd_ps(facc[v], _mm256_loadu_ps(rc.xscale.data() + v * 8), bias);
    }
    if constexpr (T::kOneColPerVec) {
      if (e.y_type == FloatType::F32 && valid == 2) {
        // y[c] holds column c for rows (0 2 4 6 | 1 3 5 7): interleave into (row, 2 columns) pairs
        const __m256 lo = _mm256_unpacklo_ps(y[0], y[1]), hi = _mm256_unpackhi_ps(y[0], y[1]);
        float* out = static_cast<float*>(e.y) + rc.m0 * N + n0;
        const __m128 r02 = _mm256_castps256_ps128(lo), r13 = _mm256_extractf128_ps(lo, 1);
        const __m128 r46 = _mm256_castps256_ps128(hi), r57 = _mm256_extractf128_ps(hi, 1);
        _mm_storel_pi(reinterpret_cast<__m64*>(out), r02);
        _mm_storel_pi(reinterpret_cast<__m64*>(out + N), r13);
        _mm_storeh_pi(reinterpret_cast<__m64*>(out + 2 * N), r02);
        _mm_storeh_pi(reinterpret_cast<__m64*>(out + 3 * N), r13);
        _mm_storel_pi(reinterpret_cast<__m64*>(out + 4 * N), r46);
        _mm_storel_pi(reinterpret_cast<__m64*>(out + 5 * N), r57);
        _mm_storeh_pi(reinterpret_cast<__m64*>(out + 6 * N), r46);
        _mm_storeh_pi(reinterpret_cast<__m64*>(out + 7 * N), r57);
        return;
      }
    }
    for (int v = 0; v < T::kVecs; ++v) {
      alignas(32) float t[8];
      _mm256_store_ps(t, y[v]);
      for (int l = 0; l < 8; ++l)
        if (T::col(v, l) < valid) store_float(e.y, e.y_type, (rc.m0 + T::row(v, l)) * N + n0 + T::col(v, l), t[l]);
    }
  }
};

// The integer GEMM: out[m, n, g] = total - offset, exact.
template <class T>
struct GemmSink {
  int32_t* out;
  const RowConsts& rc;
  int64_t N, G, n0;
  int valid;

  PQ_INLINE void group(int64_t g, const __m256i (&tot)[T::kVecs], __m256 (&)[T::kVecs]) const {
    for (int v = 0; v < T::kVecs; ++v) {
      const __m256i offs = load32(rc.offs.data() + (g * T::kVecs + v) * 8);
      alignas(32) int32_t t[8];
      _mm256_store_si256(reinterpret_cast<__m256i*>(t), _mm256_sub_epi32(tot[v], offs));
      for (int l = 0; l < 8; ++l)
        if (T::col(v, l) < valid) out[((rc.m0 + T::row(v, l)) * N + n0 + T::col(v, l)) * G + g] = t[l];
    }
  }
  void finish(const __m256 (&)[T::kVecs]) const {}
};

// ------------------------------------------------------------------ low-bit tiles (int4, int2, ternary)

// How long products may be added in int16 before vpmaddwd widens them. One vpmaddubsw lane is
// a pair sum c1*x1 + c2*x2 with codes c <= max_code and |x| <= 127, so |pair| <= 2*max_code*127
// and a lane holds floor(32767 / that) pairs:
//   int4 (max_code 15): |pair| <= 3810, 8 pairs (30480);
//   int2 (max_code 3):  |pair| <= 762, 43 pairs (32766);
//   ternary (codes {0, 1, 2} by definition, max_code 2): |pair| <= 508, 64 pairs (32512).
// A lane of the pair layout receives one pair per 16 K-elements, of the row layout one per 32;
// flushes happen every whole number of blocks that fits. Scale groups (<= 128 elements, so
// <= 8 pairs) fit every format.
constexpr int max_pairs(WeightKind kind) { return 32767 / (2 * traits(kind).max_code * kActQmax); }
static_assert(max_pairs(WeightKind::Int4) == 8 && max_pairs(WeightKind::Int2) == 43 &&
              max_pairs(WeightKind::Ternary) == 64);

// The pair-layout accumulate step: planes [P0, P0 + NP) of block b, both halves.
template <WeightKind KIND, int NQ, int C>
struct LowbitPair {
  using Tile = PairTile<NQ, C>;
  static constexpr int BITS = traits(KIND).bits;
  static constexpr int kBlock = 32 * (8 / BITS);  // elements per block (32 bytes per weight row)
  static constexpr int kFlushBlocks = max_pairs(KIND) / (kBlock / 16);
  const int8_t* xt;         // pack_pair_tile
  const uint8_t* w[C];      // weight rows

  template <int P0, int NP>
  PQ_INLINE void accumulate(int64_t b, __m256i (&acc)[8]) const {
    const __m256i mask = _mm256_set1_epi8(static_cast<char>((1 << BITS) - 1));
    const int8_t* xb = xt + b * (kBlock / 16) * NQ * 32;
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h) {
#pragma GCC unroll 4
      for (int p = P0; p < P0 + NP; ++p) {
        if constexpr (C <= 2) {
          // codes of both columns in registers, each activation vector loaded once for both:
          // this VM sustains ~1.5 32-byte loads per cycle, so loads are worth saving
          __m256i code[C];
#pragma GCC unroll 2
          for (int c = 0; c < C; ++c) {
            const __m256i wv = broadcast16(w[c] + b * 32 + 16 * h);
            code[c] = p == 0 ? _mm256_and_si256(wv, mask) : _mm256_and_si256(_mm256_srli_epi16(wv, p * BITS), mask);
          }
#pragma GCC unroll 4
          for (int q = 0; q < NQ; ++q) {
            __m256i xv = load32(xb + ((2 * p + h) * NQ + q) * 32);
            keep_order(xv);
#pragma GCC unroll 2
            for (int c = 0; c < C; ++c) {
              acc[c * NQ + q] = _mm256_add_epi16(acc[c * NQ + q], _mm256_maddubs_epi16(code[c], xv));
              keep_order(acc[c * NQ + q]);
            }
          }
        } else {  // too few registers for every column's codes: one column at a time
#pragma GCC unroll 8
          for (int c = 0; c < C; ++c) {
            const __m256i wv = broadcast16(w[c] + b * 32 + 16 * h);
            const __m256i code = p == 0 ? _mm256_and_si256(wv, mask)
                                        : _mm256_and_si256(_mm256_srli_epi16(wv, p * BITS), mask);
#pragma GCC unroll 4
            for (int q = 0; q < NQ; ++q) {
              acc[c * NQ + q] = _mm256_add_epi16(acc[c * NQ + q],
                                                 _mm256_maddubs_epi16(code, load32(xb + ((2 * p + h) * NQ + q) * 32)));
              keep_order(acc[c * NQ + q]);
            }
          }
        }
      }
    }
  }
};

// The row-layout accumulate step: one canonical activation row, 8 weight columns.
template <WeightKind KIND>
struct LowbitRow {
  using Tile = RowTile;
  static constexpr int BITS = traits(KIND).bits;
  static constexpr int kBlock = 32 * (8 / BITS);
  static constexpr int kFlushBlocks = max_pairs(KIND) / (kBlock / 32);
  const int8_t* xt;  // the activation row itself
  const uint8_t* w[8];
  const char* pf = nullptr;  // the next tile's first weight row, prefetched block by block
  int64_t ldw = 0;

  template <int P0, int NP>
  PQ_INLINE void accumulate(int64_t b, __m256i (&acc)[8]) const {
    if (pf != nullptr && P0 == 0)
      for (int c = 0; c < 8; ++c) _mm_prefetch(pf + c * ldw + b * 32, _MM_HINT_T0);
    // each weight vector loaded once and unpacked plane by plane; activations as memory operands
    const __m256i mask = _mm256_set1_epi8(static_cast<char>((1 << BITS) - 1));
#pragma GCC unroll 8
    for (int c = 0; c < 8; ++c) {
      const __m256i wv = load32(w[c] + b * 32);
#pragma GCC unroll 4
      for (int p = P0; p < P0 + NP; ++p) {
        const __m256i code =
            p == 0 ? _mm256_and_si256(wv, mask) : _mm256_and_si256(_mm256_srli_epi16(wv, p * BITS), mask);
        acc[c] = _mm256_add_epi16(acc[c], _mm256_maddubs_epi16(code, load32(xt + b * kBlock + p * 32)));
        keep_order(acc[c]);
      }
    }
  }
};

// int16 sums of one scale group -> exact int32 totals (level_mul applied) -> sink; resets acc.
template <class Tile, class Sink>
PQ_INLINE void flush_group(__m256i (&acc)[8], __m256i mulv, int64_t g, const Sink& sink,
                           __m256 (&facc)[Tile::kVecs]) {
  __m256i wide[8], tot[Tile::kVecs];
#pragma GCC unroll 8
  for (int a = 0; a < 8; ++a) {
    wide[a] = _mm256_madd_epi16(acc[a], mulv);
    acc[a] = _mm256_setzero_si256();
  }
  Tile::totals(wide, tot);
  sink.group(g, tot, facc);
}

// One tile over all of K for a low-bit format. GROUP: elements per scale group, 0 = one
// group per output channel (int16 sums then flush into int32 accumulators every
// kFlushBlocks blocks and are totalled once at the end).
// Not inlined into the column loop: its loop-invariant values would take registers from the
// accumulators (measured: spills in the grouped and int8 loops).
template <int GROUP, class Step, class Sink>
__attribute__((noinline)) void lowbit_tile(const Step& step, int64_t k_pad, int16_t level_mul, const Sink& sink) {
  using Tile = typename Step::Tile;
  constexpr int BE = Step::kBlock;
  constexpr int P = BE / 32;  // bit planes per block
  const int64_t nblocks = k_pad / BE;
  const __m256i mulv = _mm256_set1_epi16(level_mul);
  __m256i acc[8];
  __m256 facc[Tile::kVecs];
#pragma GCC unroll 8
  for (int a = 0; a < 8; ++a) acc[a] = _mm256_setzero_si256();
  for (auto& f : facc) f = _mm256_setzero_ps();

  if constexpr (GROUP == 0) {
    if (nblocks <= Step::kFlushBlocks) {  // all of K fits one int16 period (ternary K <= 1024)
      for (int64_t b = 0; b < nblocks; ++b) step.template accumulate<0, P>(b, acc);
      flush_group<Tile>(acc, mulv, 0, sink, facc);
      sink.finish(facc);
      return;
    }
    __m256i acc32[8];
#pragma GCC unroll 8
    for (int a = 0; a < 8; ++a) acc32[a] = _mm256_setzero_si256();
    for (int64_t b0 = 0; b0 < nblocks; b0 += Step::kFlushBlocks) {
      const int64_t b1 = std::min<int64_t>(nblocks, b0 + Step::kFlushBlocks);
      for (int64_t b = b0; b < b1; ++b) step.template accumulate<0, P>(b, acc);
#pragma GCC unroll 8
      for (int a = 0; a < 8; ++a) {
        acc32[a] = _mm256_add_epi32(acc32[a], _mm256_madd_epi16(acc[a], mulv));
        acc[a] = _mm256_setzero_si256();
      }
    }
    __m256i tot[Tile::kVecs];
    Tile::totals(acc32, tot);
    sink.group(0, tot, facc);
  } else if constexpr (GROUP >= BE) {
    constexpr int BPG = GROUP / BE;  // blocks per group
    for (int64_t b = 0; b < nblocks; b += BPG) {
      step.template accumulate<0, P>(b, acc);
      if constexpr (BPG == 2) step.template accumulate<0, P>(b + 1, acc);
      flush_group<Tile>(acc, mulv, b / BPG, sink, facc);
    }
  } else {
    constexpr int PPG = GROUP / 32;  // planes per group
    constexpr int GPB = P / PPG;     // groups per block
    for (int64_t b = 0; b < nblocks; ++b) {
      step.template accumulate<0, PPG>(b, acc);
      flush_group<Tile>(acc, mulv, b * GPB, sink, facc);
      step.template accumulate<PPG, PPG>(b, acc);
      flush_group<Tile>(acc, mulv, b * GPB + 1, sink, facc);
      if constexpr (GPB == 4) {
        step.template accumulate<2, 1>(b, acc);
        flush_group<Tile>(acc, mulv, b * GPB + 2, sink, facc);
        step.template accumulate<3, 1>(b, acc);
        flush_group<Tile>(acc, mulv, b * GPB + 3, sink, facc);
      }
    }
  }
  sink.finish(facc);
}

// ------------------------------------------------------------------ int8 tiles

// |w*x| <= 127*127 and a vpmaddwd lane adds two such products (<= 32258), so int32 lanes
// take K / 8 of them: |total| <= 16129 * K < 2^31 for K < 133000.
// Weights are widened with shifts (even_epi16 / odd_epi16): measured faster here than
// vpmaddubsw against 0/1 selectors, which competes with vpmaddwd for the two multiply pipes.

template <int NQ, int C>
struct Int8Pair {
  using Tile = PairTile<NQ, C>;
  const int16_t* xt;  // widen_pair_tile
  const int8_t* w[C];

  PQ_INLINE void accumulate(int64_t t, __m256i (&acc)[8]) const {  // one 16-element chunk
    const int16_t* xc = xt + t * NQ * 32;
    if constexpr (C <= 2) {
      // both columns' widened weights in registers and each activation vector loaded once:
      // 10 loads per 8 products instead of 18 (this VM sustains ~1.5 loads per cycle)
      __m256i we[C], wo[C];
#pragma GCC unroll 2
      for (int c = 0; c < C; ++c) {
        const __m256i wv = broadcast16(w[c] + 16 * t);
        we[c] = even_epi16(wv);
        wo[c] = odd_epi16(wv);
      }
#pragma GCC unroll 4
      for (int q = 0; q < NQ; ++q) {
        __m256i xe = load32(xc + q * 32), xo = load32(xc + q * 32 + 16);
        keep_order(xe);
        keep_order(xo);
#pragma GCC unroll 2
        for (int c = 0; c < C; ++c) {
          acc[c * NQ + q] = _mm256_add_epi32(acc[c * NQ + q], _mm256_madd_epi16(we[c], xe));
          keep_order(acc[c * NQ + q]);
          acc[c * NQ + q] = _mm256_add_epi32(acc[c * NQ + q], _mm256_madd_epi16(wo[c], xo));
          keep_order(acc[c * NQ + q]);
        }
      }
    } else {
#pragma GCC unroll 8
      for (int c = 0; c < C; ++c) {
        const __m256i wv = broadcast16(w[c] + 16 * t);
        const __m256i we = even_epi16(wv), wo = odd_epi16(wv);
#pragma GCC unroll 4
        for (int q = 0; q < NQ; ++q) {
          acc[c * NQ + q] = _mm256_add_epi32(acc[c * NQ + q], _mm256_madd_epi16(we, load32(xc + q * 32)));
          keep_order(acc[c * NQ + q]);
          acc[c * NQ + q] = _mm256_add_epi32(acc[c * NQ + q], _mm256_madd_epi16(wo, load32(xc + q * 32 + 16)));
          keep_order(acc[c * NQ + q]);
        }
      }
    }
  }
  static constexpr int kStep = 16;
};

struct Int8Row {
  using Tile = RowTile;
  const int16_t* xt;  // widen_row
  const int8_t* w[8];
  const char* pf = nullptr;  // the next tile's first weight row, prefetched chunk by chunk
  int64_t ldw = 0;

  PQ_INLINE void accumulate(int64_t t, __m256i (&acc)[8]) const {  // one 32-element chunk
    if (pf != nullptr && t % 2 == 0)
      for (int c = 0; c < 8; ++c) _mm_prefetch(pf + c * ldw + t * 32, _MM_HINT_T0);
    const int16_t* xc = xt + t * 32;
#pragma GCC unroll 8
    for (int c = 0; c < 8; ++c) {
      const __m256i wv = load32(w[c] + 32 * t);
      acc[c] = _mm256_add_epi32(acc[c], _mm256_madd_epi16(even_epi16(wv), load32(xc)));
      keep_order(acc[c]);
      acc[c] = _mm256_add_epi32(acc[c], _mm256_madd_epi16(odd_epi16(wv), load32(xc + 16)));
      keep_order(acc[c]);
    }
  }
  static constexpr int kStep = 32;
};

template <class Step, class Sink>
__attribute__((noinline)) void int8_tile(const Step& step, int64_t k_pad, const Sink& sink) {
  using Tile = typename Step::Tile;
  __m256i acc[8];
#pragma GCC unroll 8
  for (int a = 0; a < 8; ++a) acc[a] = _mm256_setzero_si256();
  for (int64_t t = 0; t < k_pad / Step::kStep; ++t) step.accumulate(t, acc);
  __m256i tot[Tile::kVecs];
  __m256 facc[Tile::kVecs];
  for (auto& f : facc) f = _mm256_setzero_ps();
  Tile::totals(acc, tot);
  sink.group(0, tot, facc);
  sink.finish(facc);
}

// ------------------------------------------------------------------ tile loops

// Column block kept hot in L2 (512 KiB per core on Zen 3) while every row tile streams past it.
constexpr int64_t kL2WeightBytes = 192 * 1024;

// One row tile's prepared activations (packed or widened) and per-lane constants.
struct RowSlot {
  RowConsts rc;
  std::vector<int8_t> x8;
  std::vector<int16_t> x16;
};

// Scratch reused across calls on the same thread.
struct Scratch {
  std::vector<RowSlot> slots;
};
Scratch& scratch() {
  thread_local Scratch s;
  return s;
}

// Calls fn(TileTag) with the register tile used for `rows` rows: 8 when available (each
// unpacked weight vector serves 4 row pairs), then 4, 2 and the single-row kernel.
template <class Fn>
inline void with_tile(int rows, Fn&& fn) {
  if (rows == 8) fn(PairTile<4, 2>{});
  else if (rows == 4) fn(PairTile<2, 4>{});
  else if (rows == 2) fn(PairTile<1, 8>{});
  else fn(RowTile{});
}

// Runs one format over [m0, m1) x [n0, n1). Every row tile is prepared once (activations packed
// for the tile, lane constants), then column blocks sized for L2 sweep over all of them: the
// block's weights are reused by every row tile while they are in L2.
template <class F>
void run_tiles(const GemmProblem& p, const LinearEpilogue* e, int32_t* out, int64_t m0, int64_t m1, int64_t n0,
               int64_t n1) {
  const int64_t row_bytes = p.k_pad / codes_per_byte(p.kind);
  const int64_t nb = std::max<int64_t>(8, kL2WeightBytes / row_bytes / 8 * 8);
  Scratch& sc = scratch();
  size_t tiles = 0;
  for (int64_t m = m0; m < m1; ++tiles) {
    const int64_t left = m1 - m;
    const int rows = left >= 8 ? 8 : left >= 4 ? 4 : left >= 2 ? 2 : 1;
    if (sc.slots.size() <= tiles) sc.slots.emplace_back();
    with_tile(rows, [&](auto tile) { F::template prepare<decltype(tile)>(p, e, m, sc.slots[tiles]); });
    m += rows;
  }
  for (int64_t b0 = n0; b0 < n1; b0 += nb) {
    const int64_t b1 = std::min(n1, b0 + nb);
    for (size_t i = 0; i < tiles; ++i)
      with_tile(sc.slots[i].rc.rows,
                [&](auto tile) { F::template columns<decltype(tile)>(p, e, out, b0, b1, sc.slots[i]); });
  }
}

// The weight rows of a column tile are contiguous, but the tile reads them as kCols interleaved
// streams a few cache lines long, which the hardware prefetchers follow poorly: at M = 1 the
// weights come from DRAM and the kernel waited on every line. So every tile prefetches the
// tile kPrefetchBytes ahead; single-row tiles larger than kPacedPrefetchBytes instead
// prefetch the next tile block by block inside the kernel, as a burst of that many lines
// would overflow the core's miss queue (measured, M = 1 from DRAM: 768x3072 ternary 55-62 -> 35-42 us).
constexpr int64_t kPrefetchBytes = 4096;
constexpr int64_t kPacedPrefetchBytes = 2048;

// Runs tile(step, sink) on every column tile of [b0, b1) for one row tile.
template <class T, class StepFn, class TileFn>
void column_tiles(const GemmProblem& p, const LinearEpilogue* e, int32_t* out, int64_t b0, int64_t b1,
                  const RowConsts& rc, const StepFn& make_step, const TileFn& tile) {
  const int64_t G = num_groups(p.k_pad, p.group_size);
  const int64_t row_bytes = p.k_pad / codes_per_byte(p.kind), tile_bytes = T::kCols * row_bytes;
  const char* wbytes = static_cast<const char*>(p.weight);
  const int64_t ahead = (kPrefetchBytes + tile_bytes - 1) / tile_bytes * T::kCols;  // columns
  constexpr bool can_pace = requires(typename std::invoke_result_t<StepFn, const int64_t*> st) { st.pf; };
  const bool paced = can_pace && tile_bytes > kPacedPrefetchBytes;
  // the first tiles too, all lines at once, so their misses overlap
  const int64_t first_bytes = std::min(paced ? T::kCols : ahead, b1 - b0) * row_bytes;
  for (int64_t off = 0; off < first_bytes; off += 64) _mm_prefetch(wbytes + b0 * row_bytes + off, _MM_HINT_T0);
  for (int64_t n = b0; n < b1; n += T::kCols) {
    if (!paced && n + ahead < b1) {
      const char* next = wbytes + (n + ahead) * row_bytes;
      for (int64_t off = 0; off < tile_bytes; off += 64) _mm_prefetch(next + off, _MM_HINT_T0);
    }
    const int valid = static_cast<int>(std::min<int64_t>(T::kCols, b1 - n));
    int64_t cols[T::kCols];
    for (int c = 0; c < T::kCols; ++c) cols[c] = n + std::min(c, valid - 1);
    auto step = make_step(cols);
    if constexpr (can_pace) {
      if (paced && n + T::kCols < b1) {
        step.pf = wbytes + (n + T::kCols) * row_bytes;
        step.ldw = row_bytes;
      }
    }
    if (e) tile(step, LinearSink<T>{*e, rc, p.N, G, n, valid});
    else tile(step, GemmSink<T>{out, rc, p.N, G, n, valid});
  }
}

template <WeightKind KIND, int GROUP>
struct LowbitFormat {
  static constexpr int BITS = traits(KIND).bits;

  template <class T>
  static void prepare(const GemmProblem& p, const LinearEpilogue* e, int64_t m, RowSlot& slot) {
    fill_row_consts<T>(p, e, m, slot.rc);
    if constexpr (T::kRows > 1) {
      slot.x8.resize(T::kRows * p.k_pad);
      pack_pair_tile(p.x_q + m * p.k_pad, p.k_pad, T::kRows / 2, p.k_pad, slot.x8.data());
    }
  }

  template <class T>
  static void columns(const GemmProblem& p, const LinearEpilogue* e, int32_t* out, int64_t b0, int64_t b1,
                      const RowSlot& slot) {
    const int64_t ldw = p.k_pad / (8 / BITS);
    const uint8_t* w = static_cast<const uint8_t*>(p.weight);
    const int16_t mul = static_cast<int16_t>(traits(p.kind).level_mul);
    auto tile = [&](const auto& step, const auto& sink) __attribute__((always_inline)) {
      lowbit_tile<GROUP>(step, p.k_pad, mul, sink);
    };
    if constexpr (T::kRows == 1) {
      const int8_t* x = p.x_q + slot.rc.m0 * p.k_pad;  // the single-row kernel reads the row as is
      column_tiles<T>(p, e, out, b0, b1, slot.rc, [&](const int64_t* cols) __attribute__((always_inline)) {
        LowbitRow<KIND> s{x, {}};
        for (int c = 0; c < 8; ++c) s.w[c] = w + cols[c] * ldw;
        return s;
      }, tile);
    } else {
      constexpr int NQ = T::kRows / 2, C = T::kCols;
      column_tiles<T>(p, e, out, b0, b1, slot.rc, [&](const int64_t* cols) __attribute__((always_inline)) {
        LowbitPair<KIND, NQ, C> s{slot.x8.data(), {}};
        for (int c = 0; c < C; ++c) s.w[c] = w + cols[c] * ldw;
        return s;
      }, tile);
    }
  }
};

struct Int8Format {
  template <class T>
  static void prepare(const GemmProblem& p, const LinearEpilogue* e, int64_t m, RowSlot& slot) {
    fill_row_consts<T>(p, e, m, slot.rc);
    slot.x16.resize(T::kRows * p.k_pad);
    if constexpr (T::kRows == 1) widen_row(p.x_q + m * p.k_pad, p.k_pad, slot.x16.data());
    else widen_pair_tile(p.x_q + m * p.k_pad, p.k_pad, T::kRows / 2, p.k_pad, slot.x16.data());
  }

  template <class T>
  static void columns(const GemmProblem& p, const LinearEpilogue* e, int32_t* out, int64_t b0, int64_t b1,
                      const RowSlot& slot) {
    const int8_t* w = static_cast<const int8_t*>(p.weight);
    auto tile = [&](const auto& step, const auto& sink) __attribute__((always_inline)) {
      int8_tile(step, p.k_pad, sink);
    };
    if constexpr (T::kRows == 1) {
      column_tiles<T>(p, e, out, b0, b1, slot.rc, [&](const int64_t* cols) __attribute__((always_inline)) {
        Int8Row s{slot.x16.data(), {}};
        for (int c = 0; c < 8; ++c) s.w[c] = w + cols[c] * p.k_pad;
        return s;
      }, tile);
    } else {
      constexpr int NQ = T::kRows / 2, C = T::kCols;
      column_tiles<T>(p, e, out, b0, b1, slot.rc, [&](const int64_t* cols) __attribute__((always_inline)) {
        Int8Pair<NQ, C> s{slot.x16.data(), {}};
        for (int c = 0; c < C; ++c) s.w[c] = w + cols[c] * p.k_pad;
        return s;
      }, tile);
    }
  }
};

template <WeightKind KIND>
void run_grouped(const GemmProblem& p, const LinearEpilogue* e, int32_t* out, int64_t m0, int64_t m1, int64_t n0,
                 int64_t n1) {
  switch (p.group_size) {
    case 32:
      return run_tiles<LowbitFormat<KIND, 32>>(p, e, out, m0, m1, n0, n1);
    case 64:
      return run_tiles<LowbitFormat<KIND, 64>>(p, e, out, m0, m1, n0, n1);
    case 128:
      return run_tiles<LowbitFormat<KIND, 128>>(p, e, out, m0, m1, n0, n1);
    default:
      return run_tiles<LowbitFormat<KIND, 0>>(p, e, out, m0, m1, n0, n1);
  }
}

void run(const GemmProblem& p, const LinearEpilogue* e, int32_t* out, int64_t m0, int64_t m1, int64_t n0,
         int64_t n1) {
  if (m0 >= m1 || n0 >= n1) return;
  switch (p.kind) {
    case WeightKind::Int8:
      return run_tiles<Int8Format>(p, e, out, m0, m1, n0, n1);
    case WeightKind::Int4:
      return run_grouped<WeightKind::Int4>(p, e, out, m0, m1, n0, n1);
    case WeightKind::Int2:
      return run_grouped<WeightKind::Int2>(p, e, out, m0, m1, n0, n1);
    case WeightKind::Ternary:  // always one scale per output channel
      return run_tiles<LowbitFormat<WeightKind::Ternary, 0>>(p, e, out, m0, m1, n0, n1);
  }
}

void avx2_gemm(const GemmProblem& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1, int32_t* out, const NextColumns*) {
  run(p, nullptr, out, m0, m1, n0, n1);
}

void avx2_linear(const GemmProblem& p, const LinearEpilogue& e, int64_t m0, int64_t m1, int64_t n0, int64_t n1,
                 const NextColumns*) {
  run(p, &e, nullptr, m0, m1, n0, n1);
}

}  // namespace

const KernelTable& avx2_kernels() {
  static const KernelTable table{"avx2", avx2_quantize_rows, avx2_gemm, avx2_linear, {0, 8, 96 * 1024},
                                 portable_hadamard,  // compiled with AVX2 here: its wide stages vectorise
                                 0,
                                 &avx2_block_kernels()};
  return table;
}

}  // namespace pyclipq::cpu
