// The AVX-512 VNNI kernel table ("avx512_vnni"). Compiled with -mavx512f -mavx512bw -mavx512vl
// -mavx512dq -mavx512vnni (see CMakeLists.txt) and only selected when CPUID reports those and
// XGETBV says the OS saves the opmask and zmm state (isa.cpp).
//
// One integer core for every format. vpdpbusd multiplies u8 x s8 and adds 4 products into each
// int32 lane without saturation. The weight is the unsigned operand u = level + O, the int8
// activation the signed one, and
//     sum_k level_k * x_k = sum_k u_k * x_k - O * sum_k x_k
// with O = 128 for int8 (u = w + 128: the sign bit flipped) and O = level_offset for the low-bit
// formats (u = level_mul * code). The activation group sums come with the quantized activations
// (the int8 GEMM op computes its row sums itself), so the canonical layout is read as stored
// and nothing has to be precomputed per output channel. Activations keep the full [-127, 127].
//
// int32 bound: |u * x| <= 255 * 127, so a lane of sum u*x can wrap for int8 at K > 66000. That is
// harmless: vpdpbusd and the correction are both exact modulo 2^32, and the true total
// |sum level * x| <= 127 * 127 * K fits int32 for K < 133000 (the AVX2 table's limit too).
//
// Two register tiles, chosen per task by its row count (the results are bit-identical: both
// produce exact int32 group totals and run the same float epilogue per output):
// * Broadcast tile, for tasks of >= min_broadcast_rows rows (3 to 8 by format). The task repacks its column range
//   once, L2 block by L2 block, into u8 operands in [16-column panel][K / 4][16 columns][4]
//   order (a 16 x 16 dword transpose per 64 K-elements of 16 columns). A 6-row x 64-column tile
//   then does one vpdpbusd per (row, panel, 4 K-elements) with the row's 4 activation bytes
//   broadcast: every lane is one output, so group totals need no horizontal sums, and each
//   decoded weight vector is reused by 6 rows. The repack costs ~8 instructions per 64 weights,
//   paid once per task for all of its rows.
// * Dot tile, for few rows (M = 1): one activation row x 16 columns straight from the canonical
//   layout. 64 consecutive codes are one 64-byte load (int8) or one 32-byte broadcast, a
//   per-half variable shift and a mask (docs/FORMATS.md's block-planar planes p and p+1 are 64
//   consecutive elements). Lanes are summed at each group end by a 16 x 16 transpose-add
//   (45 instructions per 16 outputs). The next column tile is prefetched block by block.
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "block_kernels.h"
#include "kernels_avx512_common.h"
#include "kernels_portable.h"

// GCC 12's avx512fintrin.h builds the reductions and masked converts on _mm512_undefined_*
// values and then warns that they are used uninitialized (a false positive: every lane that is
// read is written first).
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace pyclipq::cpu {
namespace {

// acc += u8 x s8 dot products. GCC 12 compiles _mm512_dpbusd_epi32 in unrolled loops with a
// register copy and a stack store per accumulator per call (measured: 0.5x the speed); the
// asm form keeps each accumulator in its register.
PQ_INLINE void dpbusd(__m512i& acc, __m512i u8, __m512i s8) { asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u8), "v"(s8)); }

// ------------------------------------------------------------------ activation quantization

template <FloatType T>
PQ_INLINE __m512 load16(const void* base, int64_t i, __mmask16 m) {
  if constexpr (T == FloatType::F32) {
    return _mm512_maskz_loadu_ps(m, static_cast<const float*>(base) + i);
  } else {
    const __m256i h = _mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(base) + i);
    if constexpr (T == FloatType::BF16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    return _mm512_cvtph_ps(h);
  }
}

// round(v * inv) clamped to [-127, 127] (clamping before the conversion equals clamping after
// rounding, the bounds being integers); the conversion rounds half to even like nearbyintf.
PQ_INLINE __m512i quantize16(__m512 v, __m512 inv) {
  const __m512 t = _mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(v, inv), _mm512_set1_ps(-127.0f)), _mm512_set1_ps(127.0f));
  return _mm512_cvtps_epi32(t);
}

// 64 codes in [-127, 127] (v0 | v1 | v2 | v3, 16 each) as 64 bytes in order: two packs (no
// saturation happens) and one dword permute, where four vpmovdb cost two uops each.
PQ_INLINE __m512i pack64_epi8(__m512i v0, __m512i v1, __m512i v2, __m512i v3) {
  // after the packs, dword 4 L + j holds v_j[4 L, 4 L + 4): move it to dword 4 j + L
  const __m512i packed = _mm512_packs_epi16(_mm512_packs_epi32(v0, v1), _mm512_packs_epi32(v2, v3));
  return _mm512_permutexvar_epi32(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), packed);
}

// |x| of a row's values: vrangeps takes the larger magnitude of two vectors in one operation (abs +
// max were two); it drops NaN like max does, so NaN and Inf are caught apart: x * 0 is NaN for
// them and 0 otherwise, summed into one vector (one FMA, where a compare into a mask and its OR
// were two).
struct RowMagnitude {
  __m512 vmax[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  __m512 nonfinite[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
  PQ_INLINE void add(int u, __m512 v) {
    vmax[u] = _mm512_range_ps(vmax[u], v, 0x0B);  // imm 0b10'11: the larger |.|, sign cleared
    nonfinite[u & 1] = _mm512_fmadd_ps(v, _mm512_setzero_ps(), nonfinite[u & 1]);
  }
  PQ_INLINE float max() const {
    return _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(vmax[0], vmax[1]), _mm512_max_ps(vmax[2], vmax[3])));
  }
  PQ_INLINE bool finite() const {
    const __m512 s = _mm512_add_ps(nonfinite[0], nonfinite[1]);
    return _mm512_cmp_ps_mask(s, s, _CMP_UNORD_Q) == 0;
  }
};

template <FloatType T>
int64_t quantize_rows_t(const void* x, int64_t ldx, int64_t rows, int64_t k, int64_t k_pad, int64_t group_size,
                        const float* static_scale, int8_t* q, float* scale, int32_t* sums) {
  const int64_t groups = num_groups(k_pad, group_size);
  const int64_t glen = k_pad / groups;  // a multiple of 32
  int64_t bad_row = -1;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t row0 = r * ldx;
    RowMagnitude mag;  // four running maxima: one chained max per vector waited its latency every time
    int64_t i = 0;
    for (; i + 64 <= k; i += 64) {
#pragma GCC unroll 4
      for (int u = 0; u < 4; ++u) mag.add(u, load16<T>(x, row0 + i + 16 * u, 0xFFFF));
    }
    for (; i < k; i += 16) mag.add(0, load16<T>(x, row0 + i, first_lanes16(k - i)));
    if (!mag.finite() && bad_row < 0) bad_row = r;
    const RowScale rs = row_scale(mag.max(), static_scale);
    scale[r] = rs.scale;
    const __m512 inv = _mm512_set1_ps(rs.inv);
    int8_t* qr = q + r * k_pad;
    int32_t* sr = sums + r * groups;
    // A dynamic scale maps every |x| <= amax to at most 127 (1 + 2^-23) < 127.5, so its codes need no
    // clamp (inv is 0 below kActMinAbsmax, never inf); a static scale's do.
    auto quantize_row = [&]<bool CLAMP>() {
      auto codes = [&](int64_t c, __mmask16 lanes) {
        const __m512 v = load16<T>(x, row0 + c, lanes);
        if constexpr (CLAMP) return quantize16(v, inv);
        else return _mm512_cvtps_epi32(_mm512_mul_ps(v, inv));  // rounds half to even, like nearbyintf
      };
      // lanes past K load as 0 and quantize to 0: the zero padding of the format
      auto codes16 = [&](int64_t c) { return codes(c, c + 16 <= k ? __mmask16(0xFFFF) : c < k ? first_lanes16(k - c) : 0); };
      // group by group: a group-end test per step (`%`, a 64-bit division) was a third of this pass
      for (int64_t g = 0; g < groups; ++g) {
        __m512i gsum = _mm512_setzero_si512();
        if (glen % 64 == 0) {
          for (int64_t c = g * glen; c < (g + 1) * glen; c += 64) {
            __m512i v0, v1, v2, v3;
            if (c + 64 <= k) v0 = codes(c, 0xFFFF), v1 = codes(c + 16, 0xFFFF), v2 = codes(c + 32, 0xFFFF), v3 = codes(c + 48, 0xFFFF);
            else v0 = codes16(c), v1 = codes16(c + 16), v2 = codes16(c + 32), v3 = codes16(c + 48);
            const __m512i packed = pack64_epi8(v0, v1, v2, v3);
            gsum = _mm512_dpbusd_epi32(gsum, _mm512_set1_epi8(1), packed);  // the group's sum: one op per 64 codes
            _mm512_storeu_si512(qr + c, packed);
          }
        } else {
          for (int64_t c = g * glen; c < (g + 1) * glen; c += 32) {
            const __m512i v0 = codes16(c), v1 = codes16(c + 16);
            gsum = _mm512_add_epi32(gsum, _mm512_add_epi32(v0, v1));
            _mm_storeu_si128(reinterpret_cast<__m128i*>(qr + c), _mm512_cvtepi32_epi8(v0));
            _mm_storeu_si128(reinterpret_cast<__m128i*>(qr + c + 16), _mm512_cvtepi32_epi8(v1));
          }
        }
        sr[g] = _mm512_reduce_add_epi32(gsum);
      }
    };
    if (static_scale != nullptr) quantize_row.template operator()<true>();
    else quantize_row.template operator()<false>();
  }
  return bad_row;
}

int64_t vnni_quantize_rows(const void* x, FloatType x_type, int64_t ldx, int64_t rows, int64_t k, int64_t k_pad,
                           int64_t group_size, const float* static_scale, int8_t* q, float* scale, int32_t* sums) {
  return with_float_type(x_type, [&](auto t) {
    return quantize_rows_t<decltype(t)::value>(x, ldx, rows, k, k_pad, group_size, static_scale, q, scale, sums);
  });
}


// Lane j of the result = the sum of the 16 int32 lanes of a[j].
PQ_INLINE __m512i sum_lanes16(const __m512i (&a)[16]) {
  __m512i s[8], t[4];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i)
    s[i] = _mm512_add_epi32(_mm512_unpacklo_epi32(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_epi32(a[2 * i], a[2 * i + 1]));
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i)  // 128-bit lane L of t[i]: partial sums of columns 4 i .. 4 i + 3
    t[i] = _mm512_add_epi32(_mm512_unpacklo_epi64(s[2 * i], s[2 * i + 1]), _mm512_unpackhi_epi64(s[2 * i], s[2 * i + 1]));
  const __m512i v01 = _mm512_add_epi32(_mm512_shuffle_i32x4(t[0], t[1], _MM_SHUFFLE(1, 0, 1, 0)),
                                       _mm512_shuffle_i32x4(t[0], t[1], _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512i v23 = _mm512_add_epi32(_mm512_shuffle_i32x4(t[2], t[3], _MM_SHUFFLE(1, 0, 1, 0)),
                                       _mm512_shuffle_i32x4(t[2], t[3], _MM_SHUFFLE(3, 2, 3, 2)));
  return _mm512_add_epi32(_mm512_shuffle_i32x4(v01, v23, _MM_SHUFFLE(2, 0, 2, 0)),
                          _mm512_shuffle_i32x4(v01, v23, _MM_SHUFFLE(3, 1, 3, 1)));
}


// ------------------------------------------------------------------ epilogues

// What both tiles share about the rows and the column block they work on.
struct TileSpan {
  const GemmProblem& p;
  const int32_t* row_sums;  // [M] sums of x_q over the row for int8 when p.x_sums is absent (else nullptr)
  int64_t groups;
  int offset;               // O
  int64_t m0, n0;           // first row and column of the tile
  int valid;                // columns of the tile that exist (<= 16 * panels)

  PQ_INLINE int32_t xsum(int64_t m, int64_t g) const {
    return p.x_sums != nullptr ? p.x_sums[m * groups + g] : row_sums[m];
  }
  PQ_INLINE __mmask16 panel_mask(int c) const { return first_lanes16(std::max(0, valid - 16 * c)); }
};

// The fused linear: facc += float(total) * w_scale per group, then y = fma(facc, x_scale, bias):
// per output the same instructions as the AVX2 table (G + 2 roundings; tests allow G + 4).
// w_scale is read from the block's transposed copy [G][block columns].
template <int R, int C>
struct LinearSink {
  const TileSpan& t;
  const LinearEpilogue& e;
  const float* ws;  // the block's scales at this tile's first column, row stride ldws
  int64_t ldws;
  float* facc;  // [R][C][16], 64-byte aligned, written by group 0 (a member array would be copied to the stack)

  PQ_INLINE void add(int r, int c, int64_t g, __m512i acc) {
    const __m512i off = _mm512_set1_epi32(t.offset * t.xsum(t.m0 + r, g));
    const __m512 f = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc, off));
    const __m512 ws_g = _mm512_loadu_ps(ws + g * ldws + 16 * c);
    if (t.groups == 1) {  // one group: the same two fmas, straight to the output (no facc round trip)
      store_row(r, c, _mm512_fmadd_ps(f, ws_g, _mm512_setzero_ps()));
      return;
    }
    float* fa = facc + (r * C + c) * 16;
    _mm512_store_ps(fa, _mm512_fmadd_ps(f, ws_g, g == 0 ? _mm512_setzero_ps() : _mm512_load_ps(fa)));
  }
  PQ_INLINE void store_row(int r, int c, __m512 sum) {
    const __mmask16 m = t.panel_mask(c);
    if (m == 0) return;
    const __m512 bias = e.bias ? _mm512_maskz_loadu_ps(m, e.bias + t.n0 + 16 * c) : _mm512_setzero_ps();
    const __m512 y = _mm512_fmadd_ps(sum, _mm512_set1_ps(e.x_scale[t.m0 + r]), bias);
    finish16((t.m0 + r) * t.p.N + t.n0 + 16 * c, y, m);
  }
  // act(y) + residual, then the store: the block's epilogue in registers (no second pass over y)
  PQ_INLINE void finish16(int64_t i, __m512 y, __mmask16 m) {
    if (e.act != Activation::None) y = activate<Avx512Vec>(y, e.act);
    if (e.residual != nullptr) {
      if (e.residual_type == FloatType::F32)
        y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(m, static_cast<const float*>(e.residual) + i));
      else if (e.residual_type == FloatType::BF16)
        y = _mm512_add_ps(y, load16<FloatType::BF16>(e.residual, i, m));
      else
        y = _mm512_add_ps(y, load16<FloatType::F16>(e.residual, i, m));
    }
    store16(e.y, e.y_type, i, y, m);
  }
  // The whole tile's totals of group g; with one group, the per-row and per-column operands are
  // loaded once per tile instead of once per output vector (the epilogue was 14% at K = 512).
  template <int ROWS>
  PQ_INLINE void add_tile(const __m512i* totals, int64_t g) {
    if (t.groups != 1) {
      for (int r = 0; r < ROWS; ++r)
        for (int c = 0; c < C; ++c) add(r, c, g, totals[r * C + c]);
      return;
    }
    __m512i off[ROWS];
    __m512 xs[ROWS];
    for (int r = 0; r < ROWS; ++r) {
      off[r] = _mm512_set1_epi32(t.offset * t.xsum(t.m0 + r, 0));
      xs[r] = _mm512_set1_ps(e.x_scale[t.m0 + r]);
    }
    for (int c = 0; c < C; ++c) {
      const __mmask16 m = t.panel_mask(c);
      if (m == 0) continue;
      const __m512 ws_c = _mm512_loadu_ps(ws + 16 * c);
      const __m512 bias = e.bias ? _mm512_maskz_loadu_ps(m, e.bias + t.n0 + 16 * c) : _mm512_setzero_ps();
      for (int r = 0; r < ROWS; ++r) {
        const __m512 f = _mm512_cvtepi32_ps(_mm512_sub_epi32(totals[r * C + c], off[r]));
        const __m512 y = _mm512_fmadd_ps(_mm512_fmadd_ps(f, ws_c, _mm512_setzero_ps()), xs[r], bias);
        finish16((t.m0 + r) * t.p.N + t.n0 + 16 * c, y, m);
      }
    }
  }
  void finish(int rows) {
    if (t.groups == 1) return;
    for (int c = 0; c < C; ++c)
      for (int r = 0; r < rows; ++r) store_row(r, c, _mm512_load_ps(facc + (r * C + c) * 16));
  }
};

// The integer GEMM: out[m, n, g] = total, exact.
template <int R, int C>
struct GemmSink {
  const TileSpan& t;
  int32_t* out;

  PQ_INLINE void add(int r, int c, int64_t g, __m512i acc) {
    const __mmask16 m = t.panel_mask(c);
    const __m512i tot = _mm512_sub_epi32(acc, _mm512_set1_epi32(t.offset * t.xsum(t.m0 + r, g)));
    int32_t* dst = out + ((t.m0 + r) * t.p.N + t.n0 + 16 * c) * t.groups + g;
    if (t.groups == 1) {
      _mm512_mask_storeu_epi32(dst, m, tot);
    } else {
      const __m512i idx = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                             _mm512_set1_epi32(static_cast<int32_t>(t.groups)));
      _mm512_mask_i32scatter_epi32(dst, m, idx, tot, 4);
    }
  }
  template <int ROWS>
  PQ_INLINE void add_tile(const __m512i* totals, int64_t g) {
    for (int r = 0; r < ROWS; ++r)
      for (int c = 0; c < C; ++c) add(r, c, g, totals[r * C + c]);
  }
  void finish(int) {}
};

// ------------------------------------------------------------------ broadcast tile

constexpr int kTileRows = 6;    // 6 x 4 accumulators + 4 weight vectors + 1 broadcast: 29 of 32 registers
constexpr int kTilePanels = 4;  // 64 columns

PQ_INLINE int32_t load_i32(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// Weight lines a tile prefetches while it computes: lines 2 q and 2 q + 1 during K-quad q, so the
// reads of the next block are spread over the tile's work. Issued in bursts between tiles instead,
// they filled the miss queue and stalled the core: the weights' DRAM time (~75 us for a 3072 x 768
// int8 layer) was added to the compute time instead of hidden under it.
struct TilePrefetch {
  const char* base = nullptr;
  int64_t lines = 0;
};

// acc[r][c] = the K-quads [q0, q1) of row r against panel c (the broadcast tile's inner loop).
// FLIP: the panels hold int8 weights as they are (the tile layout, AMX's s8 operands), turned
// into u8 operands w + 128 by flipping the sign bit as they are loaded.
template <int R, bool FLIP = false>
PQ_INLINE void add_quads(__m512i (&acc)[R][kTilePanels], const int8_t* x, int64_t k_pad, const uint8_t* w0,
                         const uint8_t* w1, const uint8_t* w2, const uint8_t* w3, int64_t q0, int64_t q1,
                         TilePrefetch pf) {
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < kTilePanels; ++c) acc[r][c] = _mm512_setzero_si512();
  for (int64_t q = q0; q < q1; ++q) {
    if (2 * q < pf.lines) {
      _mm_prefetch(pf.base + 128 * q, _MM_HINT_T1);
      if (2 * q + 1 < pf.lines) _mm_prefetch(pf.base + 128 * q + 64, _MM_HINT_T1);
    }
    __m512i wv[kTilePanels] = {_mm512_load_si512(w0 + 64 * q), _mm512_load_si512(w1 + 64 * q),
                               _mm512_load_si512(w2 + 64 * q), _mm512_load_si512(w3 + 64 * q)};
    if constexpr (FLIP)
#pragma GCC unroll 4
      for (int c = 0; c < kTilePanels; ++c) wv[c] = _mm512_xor_si512(wv[c], _mm512_set1_epi8(static_cast<char>(0x80)));
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512i xb = _mm512_set1_epi32(load_i32(x + r * k_pad + 4 * q));
#pragma GCC unroll 4
      for (int c = 0; c < kTilePanels; ++c) dpbusd(acc[r][c], wv[c], xb);
    }
  }
}

// The K-quads [q0, q1) of one group for R rows x 4 panels: totals[r * 4 + c]. A function of its
// own, with nothing else in it: inlined into the group loop and its epilogue, GCC 12 kept the
// 24 accumulators in memory (measured: half speed).
template <int R, bool FLIP>
__attribute__((noinline)) void accumulate_quads(const int8_t* x, int64_t k_pad, const uint8_t* w0, const uint8_t* w1,
                                                const uint8_t* w2, const uint8_t* w3, int64_t q0, int64_t q1,
                                                TilePrefetch pf, __m512i* totals) {
  __m512i acc[R][kTilePanels];
  add_quads<R, FLIP>(acc, x, k_pad, w0, w1, w2, w3, q0, q1, pf);
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < kTilePanels; ++c) _mm512_store_si512(totals + r * kTilePanels + c, acc[r][c]);
}

// R rows x 4 panels over all of K, group by group. w[c]: panel c of the repacked block.
template <int R, bool FLIP, class Sink>
void broadcast_tile(const int8_t* x, int64_t k_pad, const uint8_t* const (&w)[kTilePanels], int64_t group_quads,
                    int64_t groups, TilePrefetch pf, Sink& sink) {
  alignas(64) __m512i totals[R * kTilePanels];
  for (int64_t g = 0; g < groups; ++g) {
    accumulate_quads<R, FLIP>(x, k_pad, w[0], w[1], w[2], w[3], g * group_quads, (g + 1) * group_quads, pf, totals);
    sink.template add_tile<R>(totals, g);
  }
  sink.finish(R);
}

// What the epilogue of a full one-group tile reads, resolved to plain pointers before its K loop.
// Reached through the sinks' references instead (TileSpan, LinearEpilogue: ~30 scalar instructions
// per output vector, reloaded after every store since a float store may alias them), the epilogue
// was 10-15% of a linear at K = 512-768 (Zen 4, one thread: 362 GOP/s against 424 without it).
struct FullTileOutput {
  float* y;               // y[m0, n0], row stride ld
  const float* residual;  // residual[m0, n0] (row stride ld) or nullptr
  int64_t ld;
  const float* w_scale;   // the tile's 64 column scales
  const float* bias;      // bias[n0] or nullptr
  const float* x_scale;   // x_scale[m0]
  int32_t offsets[kTileRows];  // O * sum(x_q) of each row
};

// R rows x 64 columns of a one-group fp32 linear, K loop and epilogue in one function so that the
// accumulators go from registers to y: the LinearSink sequence per output (bit-identical to it),
// act, then the residual.
template <int R, bool FLIP, Activation ACT, bool RESIDUAL>
__attribute__((noinline)) void full_linear_tile(const int8_t* x, int64_t k_pad, const uint8_t* const (&w)[kTilePanels],
                                                TilePrefetch pf, const FullTileOutput& o) {
  __m512i acc[R][kTilePanels];
  add_quads<R, FLIP>(acc, x, k_pad, w[0], w[1], w[2], w[3], 0, k_pad / 4, pf);
  float* const y = o.y;
  const float* const residual = o.residual;
  const int64_t ld = o.ld;
#pragma GCC unroll 4
  for (int c = 0; c < kTilePanels; ++c) {
    const __m512 ws = _mm512_loadu_ps(o.w_scale + 16 * c);
    const __m512 bias = o.bias != nullptr ? _mm512_loadu_ps(o.bias + 16 * c) : _mm512_setzero_ps();
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512 f = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r][c], _mm512_set1_epi32(o.offsets[r])));
      __m512 v = _mm512_fmadd_ps(_mm512_fmadd_ps(f, ws, _mm512_setzero_ps()), _mm512_set1_ps(o.x_scale[r]), bias);
      if constexpr (ACT != Activation::None) v = activate<Avx512Vec>(v, ACT);
      if constexpr (RESIDUAL) v = _mm512_add_ps(v, _mm512_loadu_ps(residual + r * ld + 16 * c));
      _mm512_storeu_ps(y + r * ld + 16 * c, v);
    }
  }
}

// Grouped fused linears: R rows x 4 panels over all of K with each group's float step in
// registers: facc += float(total - O * x_sums[g]) * w_scale[g] (the LinearSink sequence).
// Flushing a group costs 4 instructions per accumulator where a memory round trip cost ~10, which
// at g64 is 16 vpdpbusd. R = 3: 12 int + 12 float accumulators + 4 weight vectors + 1 broadcast.
constexpr int kGroupedTileRows = 3;

template <int R>
__attribute__((noinline)) void accumulate_groups(const int8_t* x, int64_t k_pad, const uint8_t* w0, const uint8_t* w1,
                                                 const uint8_t* w2, const uint8_t* w3, int64_t group_quads,
                                                 int64_t groups, const int32_t* x_sums, int offset, const float* ws,
                                                 int64_t ldws, TilePrefetch pf, __m512* out) {
  constexpr int C = kTilePanels;
  __m512 facc[R][C];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) facc[r][c] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512i acc[R][C];
    add_quads<R>(acc, x, k_pad, w0, w1, w2, w3, g * group_quads, (g + 1) * group_quads, pf);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const __m512i off = _mm512_set1_epi32(offset * x_sums[r * groups + g]);
#pragma GCC unroll 4
      for (int c = 0; c < C; ++c)
        facc[r][c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r][c], off)),
                                     _mm512_loadu_ps(ws + g * ldws + 16 * c), facc[r][c]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) _mm512_store_ps(reinterpret_cast<float*>(out + r * C + c), facc[r][c]);
}


// ------------------------------------------------------------------ dot tile

// The 128-element steps [s0, s1) of 1 row x 16 columns from the canonical layout, chunks H of
// each step with bit H of HMASK set: totals[j] = the 16 partial sums of column j. rows[j] =
// row0 + j * ldw. Like accumulate_quads, a function of its own so the 16 accumulators stay in
// registers. next: the next column tile (contiguous), prefetched a slice per step so that its
// misses overlap this tile's work without bursting; into L2, not L1 (measured at M = 1 from
// DRAM, Zen 4: int8 24 -> 30 GB/s, 1.7 -> 1.4 ms on the bench's 24-layer stack).
template <WeightKind KIND, int HMASK>
__attribute__((noinline)) void dot_accumulate(const int8_t* x, const uint8_t* row0, int64_t ldw, int64_t s0, int64_t s1,
                                              const char* next, int64_t next_lines_per_step, __m512i* totals) {
  __m512i acc[16];
#pragma GCC unroll 16
  for (int j = 0; j < 16; ++j) acc[j] = _mm512_setzero_si512();
  for (int64_t s = s0; s < s1; ++s) {
    if (next != nullptr)
      for (int64_t l = 0; l < next_lines_per_step; ++l) _mm_prefetch(next + (s * next_lines_per_step + l) * 64, _MM_HINT_T1);
    const __m512i x0 = _mm512_loadu_si512(x + 128 * s), x1 = _mm512_loadu_si512(x + 128 * s + 64);
#pragma GCC unroll 16
    for (int j = 0; j < 16; ++j) {
      if constexpr (HMASK & 1) dpbusd(acc[j], operands64<KIND, 0>(row0 + j * ldw, s), x0);
      if constexpr (HMASK & 2) dpbusd(acc[j], operands64<KIND, 1>(row0 + j * ldw, s), x1);
    }
  }
#pragma GCC unroll 16
  for (int j = 0; j < 16; ++j) _mm512_store_si512(totals + j, acc[j]);
}

// 1 row x 16 columns over all of K. CPG: 64-element chunks per scale group (1 or 2), or 0 for
// one group per output channel.
template <WeightKind KIND, int CPG, class Sink>
void dot_tile(const int8_t* x, const uint8_t* row0, int64_t ldw, int64_t k_pad, const char* next,
              int64_t next_lines_per_step, Sink& sink) {
  alignas(64) __m512i totals[16];
  const int64_t steps = k_pad / 128;
  auto flush = [&](int64_t g) { sink.add(0, 0, g, sum_lanes16(totals)); };
  if constexpr (CPG == 0) {
    dot_accumulate<KIND, 3>(x, row0, ldw, 0, steps, next, next_lines_per_step, totals);
    flush(0);
  } else {
    for (int64_t s = 0; s < steps; ++s) {
      if constexpr (CPG == 2) {
        dot_accumulate<KIND, 3>(x, row0, ldw, s, s + 1, next, next_lines_per_step, totals);
        flush(s);
      } else {
        dot_accumulate<KIND, 1>(x, row0, ldw, s, s + 1, next, next_lines_per_step, totals);
        flush(2 * s);
        dot_accumulate<KIND, 2>(x, row0, ldw, s, s + 1, nullptr, 0, totals);
        flush(2 * s + 1);
      }
    }
  }
  sink.finish(1);
}

// ------------------------------------------------------------------ tasks

// Tasks with at least this many rows repack their columns and use the broadcast tile; fewer
// rows read the canonical layout with the dot tile, whose cost per row is the decode and, per
// scale group, the lane sums. Measured crossover on Zen 4 (3072 x 768, 2 threads, us per call
// at M = 2 / 3 / 4 / 6 / 8, dot vs broadcast): int8 39/48/57/75/93 vs 60/63/69/83/97; ternary
// 33/44/56/80/104 vs 50/54/60/72/87; int4 g128 58/79/100/146/185 vs 62/67/80/87/103.
// Scale groups of 32 split a 64-lane vector between two groups: always the broadcast tile.
constexpr int64_t min_broadcast_rows(WeightKind kind, int64_t groups) {
  return kind == WeightKind::Int8 ? 8 : groups == 1 ? 5 : 3;
}
// Repacked u8 operands of one column block, kept in L2 (1 MiB per core on Zen 4) while the
// task's row tiles stream past them; the next block's weights are prefetched into L2 meanwhile,
// a slice per row tile. (Blocks of one 64-column tile measured ~10% slower at M = 50, with no
// gain when the weights come from DRAM.)
constexpr int64_t kL2OperandBytes = 384 * 1024;

// How far ahead of the dot tile's weight reads its prefetches run. One tile ahead is enough for
// int8 rows (a 12 KiB tile at K = 768) but not for ternary (3 KiB: the last lines arrived late;
// measured at M = 1 from DRAM, ternary read 17 GB/s where int8 read 24).
constexpr int64_t kDotPrefetchBytes = 12 * 1024;

// The lines of y (and of the residual) that the tile at rows [m, m + rows), columns [n, n + cols)
// will write, requested for writing before its K loop. The tiles walk down the rows of a column
// block, so consecutive tiles' stores are N * 4 bytes apart and no hardware prefetcher follows
// them: each line was a write-allocate miss (L3 or DRAM) at store time, stalling the epilogue.
PQ_INLINE void prefetch_output_lines(const LinearEpilogue& e, int64_t N, int64_t m, int rows, int64_t n, int64_t cols) {
  const int64_t y_bytes = e.y_type == FloatType::F32 ? 4 : 2;
  const int64_t r_bytes = e.residual_type == FloatType::F32 ? 4 : 2;
  for (int r = 0; r < rows; ++r) {
    const int64_t i = (m + r) * N + n;
    char* y = static_cast<char*>(e.y) + i * y_bytes;
    for (int64_t b = 0; b < cols * y_bytes; b += 64) _m_prefetchw(y + b);
    if (e.residual != nullptr) {
      const char* res = static_cast<const char*>(e.residual) + i * r_bytes;
      for (int64_t b = 0; b < cols * r_bytes; b += 64) _mm_prefetch(res + b, _MM_HINT_T0);
    }
  }
}

struct Scratch {
  std::vector<uint8_t> operands;  // the block's u8 operands (64-byte aligned inside)
  std::vector<float> scales;    // the block's w_scale, transposed to [G][columns]
  std::vector<int32_t> row_sums;
  std::vector<uint8_t> ragged;  // a ragged dot tile's 16 rows
  alignas(64) float facc[kTileRows * kTilePanels * 16];  // a tile's float accumulators
};
Scratch& scratch() {
  thread_local Scratch s;
  return s;
}

template <WeightKind KIND>
void run_format(const GemmProblem& p, const LinearEpilogue* e, int32_t* out, int64_t m0, int64_t m1, int64_t n0,
                int64_t n1, const NextColumns* next_task) {
  const int64_t G = num_groups(p.k_pad, p.group_size), glen = p.k_pad / G;
  const int64_t ldw = p.k_pad / codes_per_byte(KIND);
  const uint8_t* w = static_cast<const uint8_t*>(p.weight);
  Scratch& sc = scratch();
  const int32_t* row_sums = nullptr;
  if (p.x_sums == nullptr) {  // the int8 GEMM op: sum x_q over each row for the O correction
    sc.row_sums.resize(p.M);
    for (int64_t m = m0; m < m1; ++m) {
      __m512i s = _mm512_setzero_si512();
      for (int64_t k = 0; k < p.k_pad; k += 64) {
        const __m512i v = _mm512_loadu_si512(p.x_q + m * p.k_pad + k);
        s = _mm512_add_epi32(s, _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_set1_epi8(1), v));
      }
      sc.row_sums[m] = _mm512_reduce_add_epi32(s);
    }
    row_sums = sc.row_sums.data();
  }
  // The `width` columns that follow column n in this thread's work: the rest of this task, then
  // the start of its next task.
  struct ColumnSpan {
    int64_t n, count;
  };
  auto columns_after = [&](int64_t n, int64_t width) -> ColumnSpan {
    if (n < n1) return {n, std::min(width, n1 - n)};
    if (next_task != nullptr && next_task->n0 + (n - n1) < next_task->n1) {
      const int64_t in_next = next_task->n0 + (n - n1);
      return {in_next, std::min(width, next_task->n1 - in_next)};
    }
    return {0, 0};
  };
  const bool broadcast = m1 - m0 >= min_broadcast_rows(KIND, G) || glen == 32;
  // int8 weights given in the tile layout (docs/FORMATS.md) are already the broadcast tile's panel
  // order: no per-task repack (at M = 50 the repack was ~15% of the work), only a sign flip per load
  const bool tiles_given = KIND == WeightKind::Int8 && p.tile_weight != nullptr && e != nullptr;
  const uint8_t* tiles = static_cast<const uint8_t*>(p.tile_weight);
  const int64_t dot_tiles_ahead = std::max<int64_t>(1, kDotPrefetchBytes / (16 * ldw));
  const int64_t nb = broadcast ? std::max<int64_t>(64, kL2OperandBytes / p.k_pad / 64 * 64) : 256;
  for (int64_t b0 = n0; b0 < n1; b0 += nb) {
    const int64_t b1 = std::min(n1, b0 + nb), cols = (b1 - b0 + 63) / 64 * 64;
    if (e != nullptr) {
      sc.scales.assign(G * cols, 0.0f);
      for (int64_t n = b0; n < b1; ++n)
        for (int64_t g = 0; g < G; ++g) sc.scales[g * cols + n - b0] = e->w_scale[n * G + g];
    }
    if (broadcast) {
      const int64_t panels = (b1 - b0 + 15) / 16;
      const ColumnSpan ahead = columns_after(b1, nb);
      const int64_t next_lines = ahead.count * ldw / 64;
      const char* next = nullptr;
      const uint8_t* ops;
      if (tiles_given) {  // the panels as stored: 16 columns x K per panel, like a repacked block
        ops = tiles + b0 * p.k_pad;
        if (ahead.count > 0) next = reinterpret_cast<const char*>(tiles + ahead.n * p.k_pad);
      } else {
        sc.operands.resize(cols * p.k_pad + 64);
        uint8_t* packed = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(sc.operands.data()) + 63) & ~uintptr_t(63));
        repack_block<KIND>(w, ldw, b0, b1, p.k_pad, packed);
        ops = packed;
        if (ahead.count > 0) next = reinterpret_cast<const char*>(w + ahead.n * ldw);
      }
      // each tile prefetches an equal share of the next block's lines while it computes (at most
      // 2 per K-quad)
      const int64_t tile_rows = e != nullptr && G > 1 ? kGroupedTileRows : kTileRows;
      const int64_t tiles = (m1 - m0 + tile_rows - 1) / tile_rows * ((b1 - b0 + 16 * kTilePanels - 1) / (16 * kTilePanels));
      const int64_t share = next == nullptr ? 0 : std::min(p.k_pad / 2, (next_lines + tiles - 1) / tiles);
      int64_t prefetched = 0;  // lines of `next`
      auto prefetch_share = [&]() -> TilePrefetch {
        const int64_t lines = std::min(share, next_lines - prefetched);
        if (lines <= 0) return {};
        const TilePrefetch pf{next + 64 * prefetched, lines};
        prefetched += lines;
        return pf;
      };
      auto panel_ptrs = [&](int64_t n, const uint8_t* (&wp)[kTilePanels]) {  // (tiles_given: whole panels of the layer)
        for (int c = 0; c < kTilePanels; ++c) wp[c] = ops + std::min((n - b0) / 16 + c, panels - 1) * 16 * p.k_pad;
      };
      if (e != nullptr && G > 1) {
        for (int64_t m = m0; m < m1; m += kGroupedTileRows) {
          const int rows = static_cast<int>(std::min<int64_t>(kGroupedTileRows, m1 - m));
          for (int64_t n = b0; n < b1; n += 16 * kTilePanels) {
            const uint8_t* wp[kTilePanels];
            panel_ptrs(n, wp);
            const TileSpan span{p, row_sums, G, operand_offset(KIND), m, n,
                                static_cast<int>(std::min<int64_t>(16 * kTilePanels, b1 - n))};
            alignas(64) __m512 facc[kGroupedTileRows * kTilePanels];
            auto launch = [&]<int R>() {
              accumulate_groups<R>(p.x_q + m * p.k_pad, p.k_pad, wp[0], wp[1], wp[2], wp[3], glen / 4, G,
                                   p.x_sums + m * G, operand_offset(KIND), sc.scales.data() + (n - b0), cols,
                                   prefetch_share(), facc);
              LinearSink<R, kTilePanels> sink{span, *e, nullptr, 0, nullptr};
              for (int r = 0; r < R; ++r)
                for (int c = 0; c < kTilePanels; ++c) sink.store_row(r, c, facc[r * kTilePanels + c]);
            };
            if (rows == 3) launch.template operator()<3>();
            else if (rows == 2) launch.template operator()<2>();
            else launch.template operator()<1>();
          }
        }
        continue;
      }
      auto tile = [&](int64_t m, int rows, int64_t n) {
        const uint8_t* wp[kTilePanels];
        panel_ptrs(n, wp);
        if (e != nullptr) prefetch_output_lines(*e, p.N, m, rows, n, std::min<int64_t>(16 * kTilePanels, b1 - n));
        const TileSpan span{p, row_sums, G, operand_offset(KIND), m, n,
                            static_cast<int>(std::min<int64_t>(16 * kTilePanels, b1 - n))};
        if (e != nullptr && G == 1 && rows >= kTileRows - 2 && span.valid == 16 * kTilePanels && e->y_type == FloatType::F32 &&
            (e->residual == nullptr || e->residual_type == FloatType::F32)) {
          FullTileOutput o{static_cast<float*>(e->y) + m * p.N + n,
                           e->residual != nullptr ? static_cast<const float*>(e->residual) + m * p.N + n : nullptr,
                           p.N, sc.scales.data() + (n - b0), e->bias != nullptr ? e->bias + n : nullptr, e->x_scale + m, {}};
          for (int r = 0; r < rows; ++r) o.offsets[r] = span.offset * span.xsum(m + r, 0);
          const int64_t k_pad = p.k_pad;
          const int8_t* xr = p.x_q + m * k_pad;
          const TilePrefetch pf = prefetch_share();
          auto with_rows = [&]<bool FLIP, Activation ACT, bool RESIDUAL>() {
            if (rows == kTileRows) full_linear_tile<kTileRows, FLIP, ACT, RESIDUAL>(xr, k_pad, wp, pf, o);
            else if (rows == kTileRows - 1) full_linear_tile<kTileRows - 1, FLIP, ACT, RESIDUAL>(xr, k_pad, wp, pf, o);
            else full_linear_tile<kTileRows - 2, FLIP, ACT, RESIDUAL>(xr, k_pad, wp, pf, o);
          };
          auto run_tile = [&]<bool FLIP, Activation ACT>() {
            if (o.residual != nullptr) with_rows.template operator()<FLIP, ACT, true>();
            else with_rows.template operator()<FLIP, ACT, false>();
          };
          auto with_act = [&]<bool FLIP>() {
            switch (e->act) {
              case Activation::None: return run_tile.template operator()<FLIP, Activation::None>();
              case Activation::Gelu: return run_tile.template operator()<FLIP, Activation::Gelu>();
              case Activation::QuickGelu: return run_tile.template operator()<FLIP, Activation::QuickGelu>();
            }
          };
          if (tiles_given) with_act.template operator()<true>();
          else with_act.template operator()<false>();
          return;
        }
        auto launch = [&]<int R>() {
          if (e != nullptr) {
            LinearSink<R, kTilePanels> sink{span, *e, sc.scales.data() + (n - b0), cols, sc.facc};
            if (tiles_given) broadcast_tile<R, true>(p.x_q + m * p.k_pad, p.k_pad, wp, glen / 4, G, prefetch_share(), sink);
            else broadcast_tile<R, false>(p.x_q + m * p.k_pad, p.k_pad, wp, glen / 4, G, prefetch_share(), sink);
          } else {
            GemmSink<R, kTilePanels> sink{span, out};
            broadcast_tile<R, false>(p.x_q + m * p.k_pad, p.k_pad, wp, glen / 4, G, prefetch_share(), sink);
          }
        };
        switch (rows) {
          case 6: launch.template operator()<6>(); break;
          case 5: launch.template operator()<5>(); break;
          case 4: launch.template operator()<4>(); break;
          case 3: launch.template operator()<3>(); break;
          case 2: launch.template operator()<2>(); break;
          default: launch.template operator()<1>(); break;
        }
      };
      // Column tiles outer, row tiles inner: a 64-column tile's weights (16 x K bytes a panel) stay in
      // L1/L2 while the task's rows pass, and each tile reads only its rows' 6 x K activation bytes
      // anew. Rows outer re-read the whole block's weights for every 6 rows. Measured on Zen 4, int8
      // in the tile layout, a CLIP layer's four linears, best of 3 alternating processes: M = 616
      // (K = 512) 6698 -> 5662 us, M = 400 (K = 768) 8040 -> 7319, M = 77 692 -> 663, M = 50 957 -> 956.
      // The task's rows in balanced tiles of at most kTileRows (50 rows: 5 x 6 + 4 x 5, not
      // 8 x 6 + 2): a tile streams its 64 columns' weights and pays its epilogue setup whatever
      // its rows, and 4-6 rows take the register epilogue. Measured (Zen 4, 2 threads, alternating
      // processes): M = 50 +3-8%, M = 77 +7%, M = 400 unchanged.
      const int64_t row_tiles = (m1 - m0 + kTileRows - 1) / kTileRows;
      const int64_t base_rows = (m1 - m0) / row_tiles, taller = (m1 - m0) % row_tiles;
      for (int64_t n = b0; n < b1; n += 16 * kTilePanels)
        for (int64_t t = 0, m = m0; t < row_tiles; ++t) {
          const int rows = static_cast<int>(base_rows + (t < taller ? 1 : 0));
          tile(m, rows, n);
          m += rows;
        }
    } else {
      if (b0 == n0)  // the task's first tiles, up to where the per-step prefetches start
        for (int64_t off = n0 * ldw; off < std::min(n1, n0 + 16 * dot_tiles_ahead) * ldw; off += 64)
          _mm_prefetch(reinterpret_cast<const char*>(w) + off, _MM_HINT_T1);
      for (int64_t n = b0; n < b1; n += 16) {
        const int valid = static_cast<int>(std::min<int64_t>(16, b1 - n));
        // a ragged last tile reads a copy padded with its last row (the extra columns are not stored)
        const uint8_t* row0 = w + n * ldw;
        if (valid < 16) {
          sc.ragged.resize(16 * ldw);
          for (int j = 0; j < 16; ++j) std::memcpy(sc.ragged.data() + j * ldw, w + (n + std::min(j, valid - 1)) * ldw, ldw);
          row0 = sc.ragged.data();
        }
        // the tile kDotPrefetchBytes ahead (its rows are contiguous), a slice per 128-element step
        const ColumnSpan ahead = columns_after(n + 16 * dot_tiles_ahead, 16);
        const char* next = ahead.count > 0 ? reinterpret_cast<const char*>(w + ahead.n * ldw) : nullptr;
        const int64_t lines_per_step = (ahead.count * ldw / 64 + p.k_pad / 128 - 1) / (p.k_pad / 128);
        for (int64_t m = m0; m < m1; ++m) {
          const TileSpan span{p, row_sums, G, operand_offset(KIND), m, n, valid};
          const char* pf = m == m0 ? next : nullptr;
          auto launch = [&]<int CPG>() {
            if (e != nullptr) {
              LinearSink<1, 1> sink{span, *e, sc.scales.data() + (n - b0), cols, sc.facc};
              dot_tile<KIND, CPG>(p.x_q + m * p.k_pad, row0, ldw, p.k_pad, pf, lines_per_step, sink);
            } else {
              GemmSink<1, 1> sink{span, out};
              dot_tile<KIND, CPG>(p.x_q + m * p.k_pad, row0, ldw, p.k_pad, pf, lines_per_step, sink);
            }
          };
          if (G == 1) launch.template operator()<0>();
          else if (glen == 64) launch.template operator()<1>();
          else launch.template operator()<2>();
        }
      }
    }
  }
}

void run(const GemmProblem& p, const LinearEpilogue* e, int32_t* out, int64_t m0, int64_t m1, int64_t n0,
         int64_t n1,
         const NextColumns* next) {
  if (m0 >= m1 || n0 >= n1) return;
  switch (p.kind) {
    case WeightKind::Int8:
      return run_format<WeightKind::Int8>(p, e, out, m0, m1, n0, n1, next);
    case WeightKind::Int4:
      return run_format<WeightKind::Int4>(p, e, out, m0, m1, n0, n1, next);
    case WeightKind::Int2:
      return run_format<WeightKind::Int2>(p, e, out, m0, m1, n0, n1, next);
    case WeightKind::Ternary:
      return run_format<WeightKind::Ternary>(p, e, out, m0, m1, n0, n1, next);
  }
}

void vnni_gemm(const GemmProblem& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1, int32_t* out,
               const NextColumns* next) {
  run(p, nullptr, out, m0, m1, n0, n1, next);
}

void vnni_linear(const GemmProblem& p, const LinearEpilogue& e, int64_t m0, int64_t m1, int64_t n0, int64_t n1,
                 const NextColumns* next) {
  run(p, &e, nullptr, m0, m1, n0, n1, next);
}

// ---------------------------------------------------------------- Hadamard rotation

// The butterflies of distance h = 1, 2, 4, 8 inside one vector of 16 floats: lane j's partner is
// lane j ^ h (a permute within 128-bit lanes for h = 1, 2, across them for h = 4, 8); the lanes
// with bit h set take partner - self, the others self + partner. Three instructions a stage.
inline __m512 hadamard16(__m512 v) {
  __m512 s = _mm512_permute_ps(v, 0xB1);  // [1, 0, 3, 2] in each 128-bit lane
  v = _mm512_mask_sub_ps(_mm512_add_ps(v, s), 0xAAAA, s, v);
  s = _mm512_permute_ps(v, 0x4E);  // [2, 3, 0, 1]
  v = _mm512_mask_sub_ps(_mm512_add_ps(v, s), 0xCCCC, s, v);
  s = _mm512_shuffle_f32x4(v, v, 0xB1);  // 128-bit lanes [1, 0, 3, 2]
  v = _mm512_mask_sub_ps(_mm512_add_ps(v, s), 0xF0F0, s, v);
  s = _mm512_shuffle_f32x4(v, v, 0x4E);  // 256-bit halves swapped
  return _mm512_mask_sub_ps(_mm512_add_ps(v, s), 0xFF00, s, v);
}

// HadamardFn: stages h < 16 in registers (hadamard16), h >= 16 between vectors, in L1.
void vnni_hadamard(const float* x, float* y, int64_t rows, int64_t k, int64_t block) {
  if (block < 16) {
    portable_hadamard(x, y, rows, k, block);
    return;
  }
  const __m512 norm = _mm512_set1_ps(1.0f / std::sqrt(static_cast<float>(block)));
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t b0 = 0; b0 < k; b0 += block) {
      const float* xb = x + r * k + b0;
      float* yb = y + r * k + b0;
      if (block == 16) {
        _mm512_storeu_ps(yb, _mm512_mul_ps(hadamard16(_mm512_loadu_ps(xb)), norm));
        continue;
      }
      for (int64_t c = 0; c < block; c += 16) _mm512_storeu_ps(yb + c, hadamard16(_mm512_loadu_ps(xb + c)));
      for (int64_t h = 16; h < block; h *= 2) {
        const bool last = 2 * h == block;  // the last stage also scales
        for (int64_t i = 0; i < block; i += 2 * h)
          for (int64_t j = i; j < i + h; j += 16) {
            const __m512 a = _mm512_loadu_ps(yb + j), c = _mm512_loadu_ps(yb + j + h);
            __m512 lo = _mm512_add_ps(a, c), hi = _mm512_sub_ps(a, c);
            if (last) {
              lo = _mm512_mul_ps(lo, norm);
              hi = _mm512_mul_ps(hi, norm);
            }
            _mm512_storeu_ps(yb + j, lo);
            _mm512_storeu_ps(yb + j + h, hi);
          }
      }
    }
  }
}

}  // namespace

const KernelTable& avx512_vnni_kernels() {
  static const KernelTable table{"avx512_vnni", vnni_quantize_rows, vnni_gemm, vnni_linear, {kTileRows * 64, 16 * kTilePanels, 48 * 1024},
                                 vnni_hadamard,
                                 kTileLayoutInt8,
                                 &avx512_block_kernels(),
                                 true};
  return table;
}

}  // namespace pyclipq::cpu
