// The float work of a transformer block between its GEMMs: LayerNorm rows, the fused linears'
// activation + residual epilogue, and the multi-head attention core (cpu_kernels.h declares
// the interface). Written once over a vector type V and instantiated per ISA by
// block_kernels_{scalar,avx2,avx512}.cpp, each compiled with its own flags. Everything has
// internal linkage, so no wide code can leak into a narrower table through the linker (ODR).
//
// V provides: T (the vector), W (lanes), load/store (unaligned), set1, add/sub/mul, recip, fma,
// max/min, hsum/hmax, exp (exp(-inf) = 0; below -87.3 gives 0), erf.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "kernels_portable.h"
#include "pyclipq/cpu_kernels.h"

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
#if defined(__AVX512F__)
#include "kernels_avx512_common.h"  // transpose16x16_epi32 (its translation units all have AVX-512 BW/VL/DQ)
#endif

namespace pyclipq::cpu {
namespace {

// ------------------------------------------------------------------ vector types

struct ScalarVec {
  using T = float;
  static constexpr int W = 1;
  static T load(const float* p) { return *p; }
  static void store(float* p, T v) { *p = v; }
  static T set1(float v) { return v; }
  static T add(T a, T b) { return a + b; }
  static T sub(T a, T b) { return a - b; }
  static T mul(T a, T b) { return a * b; }
  static T recip(T a) { return 1.0f / a; }
  static T fma(T a, T b, T c) { return a * b + c; }
  static T max(T a, T b) { return std::max(a, b); }
  static T min(T a, T b) { return std::min(a, b); }
  static float hsum(T v) { return v; }
  static float hmax(T v) { return v; }
  static T exp(T v) { return std::exp(v); }
  static T erf(T v) { return std::erf(v); }
};

// erf(x) = x P(x^2) / Q(x^2) on x clamped to [-4, 4] (erf(4) is 1 in float): the rational
// approximation XLA and Eigen use for float (degree 13 / 8; measured in float arithmetic: |error|
// <= 4.2e-7 over the line). One reciprocal and 11 fmas: about half the work of Abramowitz-Stegun
// 7.1.26 with its exp, which made the fused GELU cost as much as a GEMM tenth.
template <class V>
inline typename V::T erf_rational(typename V::T x) {
  using T = typename V::T;
  x = V::min(V::max(x, V::set1(-4.0f)), V::set1(4.0f));
  const T x2 = V::mul(x, x);
  T p = V::set1(-2.72614225801306e-10f);
  p = V::fma(p, x2, V::set1(2.77068142495902e-08f));
  p = V::fma(p, x2, V::set1(-2.10102402082508e-06f));
  p = V::fma(p, x2, V::set1(-5.69250639462346e-05f));
  p = V::fma(p, x2, V::set1(-7.34990630326855e-04f));
  p = V::fma(p, x2, V::set1(-2.95459980854025e-03f));
  p = V::fma(p, x2, V::set1(-1.60960333262415e-02f));
  T q = V::set1(-1.45660718464996e-05f);
  q = V::fma(q, x2, V::set1(-2.13374055278905e-04f));
  q = V::fma(q, x2, V::set1(-1.68282697438203e-03f));
  q = V::fma(q, x2, V::set1(-7.37332916720468e-03f));
  q = V::fma(q, x2, V::set1(-1.42647390514189e-02f));
  return V::mul(V::mul(x, p), V::recip(q));
}

// exp by Cephes' expf polynomial after n = round(x log2 e): e^x = 2^n e^r, |r| <= ln2 / 2
// (relative error about 2e-7 where the result is normal).
template <class V>
inline typename V::T exp_reduced(typename V::T x, typename V::T* n_out) {
  using T = typename V::T;
  x = V::min(V::max(x, V::set1(-87.3f)), V::set1(88.3f));
  const T n = V::round(V::mul(x, V::set1(1.44269504088896341f)));
  T r = V::fma(n, V::set1(-0.693359375f), x);
  r = V::fma(n, V::set1(2.12194440e-4f), r);
  T p = V::set1(1.9875691500e-4f);
  p = V::fma(p, r, V::set1(1.3981999507e-3f));
  p = V::fma(p, r, V::set1(8.3334519073e-3f));
  p = V::fma(p, r, V::set1(4.1665795894e-2f));
  p = V::fma(p, r, V::set1(1.6666665459e-1f));
  p = V::fma(p, r, V::set1(5.0000001201e-1f));
  *n_out = n;
  return V::add(V::fma(p, V::mul(r, r), r), V::set1(1.0f));
}

#if defined(__AVX2__) && !defined(__AVX512F__)
struct Avx2Vec {
  using T = __m256;
  static constexpr int W = 8;
  static T load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, T v) { _mm256_storeu_ps(p, v); }
  static T set1(float v) { return _mm256_set1_ps(v); }
  static T add(T a, T b) { return _mm256_add_ps(a, b); }
  static T sub(T a, T b) { return _mm256_sub_ps(a, b); }
  static T mul(T a, T b) { return _mm256_mul_ps(a, b); }
  // 1 / a: the 12-bit estimate and one Newton step (~22 bits), several times the throughput of a divide
  static T recip(T a) {
    const T r = _mm256_rcp_ps(a);
    return _mm256_mul_ps(r, _mm256_fnmadd_ps(a, r, _mm256_set1_ps(2.0f)));
  }
  static T fma(T a, T b, T c) { return _mm256_fmadd_ps(a, b, c); }
  static T max(T a, T b) { return _mm256_max_ps(a, b); }
  static T min(T a, T b) { return _mm256_min_ps(a, b); }
  static T round(T v) { return _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static float hsum(T v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
  }
  static float hmax(T v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
  }
  static T exp(T x) {
    const T tiny = _mm256_cmp_ps(x, _mm256_set1_ps(-87.3f), _CMP_LT_OQ);  // -inf included
    T n;
    const T p = exp_reduced<Avx2Vec>(x, &n);
    const __m256i pow2 = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(tiny, _mm256_mul_ps(p, _mm256_castsi256_ps(pow2)));
  }
  static T erf(T x) { return erf_rational<Avx2Vec>(x); }
  // kt[c * ld_kt + j] = k[j * ld_k + c] for an 8 x 8 block, rows j >= rows as zeros (the attention's
  // K transpose; see Avx512Vec::transpose_block)
  static void transpose_block(const float* k, int64_t ld_k, int64_t rows, float* kt, int64_t ld_kt) {
    __m256 v[8], t[8];
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) v[j] = j < rows ? _mm256_loadu_ps(k + j * ld_k) : _mm256_setzero_ps();
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) {
      t[2 * i] = _mm256_unpacklo_ps(v[2 * i], v[2 * i + 1]);
      t[2 * i + 1] = _mm256_unpackhi_ps(v[2 * i], v[2 * i + 1]);
    }
#pragma GCC unroll 2
    for (int i = 0; i < 2; ++i) {  // v[4 i + e], 128-bit lane L: element 4 L + e of rows 4 i .. 4 i + 3
      v[4 * i] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(1, 0, 1, 0));
      v[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(3, 2, 3, 2));
      v[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(1, 0, 1, 0));
      v[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(3, 2, 3, 2));
    }
#pragma GCC unroll 4
    for (int e = 0; e < 4; ++e) {
      _mm256_storeu_ps(kt + e * ld_kt, _mm256_permute2f128_ps(v[e], v[4 + e], 0x20));
      _mm256_storeu_ps(kt + (4 + e) * ld_kt, _mm256_permute2f128_ps(v[e], v[4 + e], 0x31));
    }
  }
};
#endif

#if defined(__AVX512F__)
// kGeluHalfErf[d][i]: the u^d coefficient of h((i + u) / (kGeluPieces / kGeluTop)), u in [0, 1), for
// Avx512Vec::gelu; printed by scripts/gelu_table.py (least squares at Chebyshev points of each piece).
constexpr int kGeluDegree = 5;
constexpr float kGeluPieces = 16.0f, kGeluTop = 6.0f;
constexpr float kGeluLastPiece = 15.99999f;  // below 16: the piece index stays in the table
alignas(64) inline constexpr float kGeluHalfErf[kGeluDegree + 1][16] = {
    {1.87894966e-09f, 0.146169767f, 0.27337265f, 0.369705468f, 0.43319279f, 0.469603628f, 0.487775534f, 0.495667547f, 0.498650104f, 0.499630928f, 0.499911577f, 0.499981463f, 0.499996603f, 0.499999464f, 0.499999911f, 0.5f},
    {0.149603218f, 0.13944535f, 0.112926304f, 0.0794537067f, 0.0485692099f, 0.025794981f, 0.0119024348f, 0.00477157487f, 0.00166192593f, 0.000502902665f, 0.000132213812f, 3.01987075e-05f, 5.99261648e-06f, 1.03313982e-06f, 1.54744043e-07f, 2.01362642e-08f},
    {1.47853257e-06f, -0.00980122015f, -0.0158775095f, -0.016759349f, -0.0136613604f, -0.00906999316f, -0.0050220876f, -0.00234859483f, -0.000934643962f, -0.000318055419f, -9.28564186e-05f, -2.3312803e-05f, -5.04199988e-06f, -9.40604934e-07f, -1.5151322e-07f, -2.10903259e-08f},
    {-0.00351225911f, -0.00282372395f, -0.00117003452f, 0.000492559804f, 0.00142835744f, 0.00152726599f, 0.00113668677f, 0.000659208512f, 0.000310778967f, 0.000121621997f, 3.99879609e-05f, 1.11305399e-05f, 2.63646757e-06f, 5.33401249e-07f, 9.24279107e-08f, 1.37461909e-08f},
    {1.02058912e-05f, 0.000357248529f, 0.000477607566f, 0.000345557462f, 0.000109984678f, -6.72754832e-05f, -0.000128236774f, -0.000108120243f, -6.41693186e-05f, -2.96223079e-05f, -1.10707642e-05f, -3.4196853e-06f, -8.83874009e-07f, -1.92697797e-07f, -3.56343506e-08f, -5.61218982e-09f},
    {6.71182206e-05f, 2.52220234e-05f, -2.35295574e-05f, -4.51615524e-05f, -3.53536088e-05f, -1.30887584e-05f, 3.22745245e-06f, 8.4821213e-06f, 6.92798585e-06f, 3.81420978e-06f, 1.60595243e-06f, 5.42301791e-07f, 1.50418884e-07f, 3.47539348e-08f, 6.74971234e-09f, 1.10884824e-09f},
};

struct Avx512Vec {
  using T = __m512;
  static constexpr int W = 16;
  static T load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, T v) { _mm512_storeu_ps(p, v); }
  static T set1(float v) { return _mm512_set1_ps(v); }
  static T add(T a, T b) { return _mm512_add_ps(a, b); }
  static T sub(T a, T b) { return _mm512_sub_ps(a, b); }
  static T mul(T a, T b) { return _mm512_mul_ps(a, b); }
  // 1 / a: the 14-bit estimate and one Newton step (~23 bits), several times the throughput of a divide
  static T recip(T a) {
    const T r = _mm512_rcp14_ps(a);
    return _mm512_mul_ps(r, _mm512_fnmadd_ps(a, r, _mm512_set1_ps(2.0f)));
  }
  static T fma(T a, T b, T c) { return _mm512_fmadd_ps(a, b, c); }
  static T max(T a, T b) { return _mm512_max_ps(a, b); }
  static T min(T a, T b) { return _mm512_min_ps(a, b); }
  static T round(T v) { return _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static float hsum(T v) { return _mm512_reduce_add_ps(v); }
  static float hmax(T v) { return _mm512_reduce_max_ps(v); }
  static T exp(T x) {
    const __mmask16 tiny = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.3f), _CMP_LT_OQ);  // -inf included
    T n;
    const T p = exp_reduced<Avx512Vec>(x, &n);
    return _mm512_maskz_mov_ps(static_cast<__mmask16>(~tiny), _mm512_scalef_ps(p, n));
  }
  static T erf(T x) { return erf_rational<Avx512Vec>(x); }
  // GELU(x) = 0.5 x + |x| h(|x|), h(t) = 0.5 erf(t / sqrt 2) as 16 degree-5 polynomial pieces on
  // [0, 6) (kGeluHalfErf; h is 0.5 in float past 6): the piece from a truncation, its coefficients
  // by one vpermps each. Error 4.1e-8 of |x| + |GELU(x)|, against 4.2e-7 for erf_rational.
  static T gelu(T x) {
    const T t = _mm512_abs_ps(x);
    const T a = _mm512_min_ps(_mm512_mul_ps(t, _mm512_set1_ps(kGeluPieces / kGeluTop)), _mm512_set1_ps(kGeluLastPiece));
    const __m512i piece = _mm512_cvttps_epi32(a);
    const T u = _mm512_reduce_ps(a, _MM_FROUND_TO_NEG_INF);  // a - floor(a), in [0, 1)
    T h = _mm512_permutexvar_ps(piece, _mm512_load_ps(kGeluHalfErf[kGeluDegree]));
#pragma GCC unroll 8
    for (int d = kGeluDegree - 1; d >= 0; --d) h = _mm512_fmadd_ps(h, u, _mm512_permutexvar_ps(piece, _mm512_load_ps(kGeluHalfErf[d])));
    return _mm512_fmadd_ps(t, h, _mm512_mul_ps(x, _mm512_set1_ps(0.5f)));
  }
  // kt[c * ld_kt + j] = k[j * ld_k + c] for a 16 x 16 block, rows j >= rows as zeros: a register
  // transpose. The scalar copy it replaces, one strided store per element, was a
  // third of a head (B = 8, T = 77 causal, one thread, Zen 4: 20.5 -> 13.8 us a head).
  static void transpose_block(const float* k, int64_t ld_k, int64_t rows, float* kt, int64_t ld_kt) {
    __m512i v[16];
#pragma GCC unroll 16
    for (int j = 0; j < 16; ++j)
      v[j] = j < rows ? _mm512_castps_si512(_mm512_loadu_ps(k + j * ld_k)) : _mm512_setzero_si512();
    transpose16x16_epi32(v);  // the VNNI table's (kernels_avx512_common.h): a float is 32 bits like a dword
#pragma GCC unroll 16
    for (int c = 0; c < 16; ++c) _mm512_storeu_ps(kt + c * ld_kt, _mm512_castsi512_ps(v[c]));
  }
};
#endif

// ------------------------------------------------------------------ LayerNorm

// Two passes for the moments (the row is in L1): mean, then the mean squared deviation, as
// torch's LayerNorm; then y = (x - mean) * rstd * weight + bias.
template <class V>
void layer_norm_row_t(const float* x, int64_t k, const float* weight, const float* bias, float eps, float* y) {
  using T = typename V::T;
  constexpr int W = V::W;
  // Four accumulators per reduction: one chained add per vector waits the add's latency (3-4
  // cycles) each time, which made this row pass cost more than the linear's quantization after it.
  const int64_t kv = k / W * W, kv4 = k / (4 * W) * (4 * W);
  T acc[4] = {V::set1(0.0f), V::set1(0.0f), V::set1(0.0f), V::set1(0.0f)};
  for (int64_t i = 0; i < kv4; i += 4 * W)
    for (int u = 0; u < 4; ++u) acc[u] = V::add(acc[u], V::load(x + i + u * W));
  for (int64_t i = kv4; i < kv; i += W) acc[0] = V::add(acc[0], V::load(x + i));
  float sum = V::hsum(V::add(V::add(acc[0], acc[1]), V::add(acc[2], acc[3])));
  for (int64_t i = kv; i < k; ++i) sum += x[i];
  const float mean = sum / static_cast<float>(k);
  const T vmean = V::set1(mean);
  for (int u = 0; u < 4; ++u) acc[u] = V::set1(0.0f);
  for (int64_t i = 0; i < kv4; i += 4 * W)
    for (int u = 0; u < 4; ++u) {
      const T d = V::sub(V::load(x + i + u * W), vmean);
      acc[u] = V::fma(d, d, acc[u]);
    }
  for (int64_t i = kv4; i < kv; i += W) {
    const T d = V::sub(V::load(x + i), vmean);
    acc[0] = V::fma(d, d, acc[0]);
  }
  float sq = V::hsum(V::add(V::add(acc[0], acc[1]), V::add(acc[2], acc[3])));
  for (int64_t i = kv; i < k; ++i) sq += (x[i] - mean) * (x[i] - mean);
  const float rstd = 1.0f / std::sqrt(sq / static_cast<float>(k) + eps);
  const T vrstd = V::set1(rstd);
  for (int64_t i = 0; i < kv; i += W) {
    T v = V::mul(V::sub(V::load(x + i), vmean), vrstd);
    if (weight != nullptr) v = V::mul(v, V::load(weight + i));
    if (bias != nullptr) v = V::add(v, V::load(bias + i));
    V::store(y + i, v);
  }
  for (int64_t i = kv; i < k; ++i) {
    float v = (x[i] - mean) * rstd;
    if (weight != nullptr) v *= weight[i];
    if (bias != nullptr) v += bias[i];
    y[i] = v;
  }
}

// ------------------------------------------------------------------ epilogue

template <class V>
inline typename V::T activate(typename V::T v, Activation act) {
  if (act == Activation::Gelu) {
    if constexpr (requires { V::gelu(v); }) return V::gelu(v);  // the vector type's own (AVX-512: a table)
    else  // 0.5 x (1 + erf(x / sqrt 2))
      return V::mul(V::mul(v, V::set1(0.5f)), V::add(V::set1(1.0f), V::erf(V::mul(v, V::set1(0.70710678118654752f)))));
  }
  if (act == Activation::QuickGelu)  // x / (1 + exp(-1.702 x))
    return V::mul(v, V::recip(V::add(V::set1(1.0f), V::exp(V::mul(v, V::set1(-1.702f))))));
  return v;
}

// Full vectors where everything is fp32 (the fast path); a row buffer and per-element
// conversions where the residual or the output is 16-bit.
template <class V>
void epilogue_rows_t(const float* y, int64_t ld_y, int64_t rows, int64_t cols, const RowsEpilogue& e) {
  constexpr int W = V::W;
  const bool all_f32 = e.out_type == FloatType::F32 && (e.residual == nullptr || e.residual_type == FloatType::F32);
  alignas(64) float buf[W];
  for (int64_t r = 0; r < rows; ++r) {
    const float* yr = y + r * ld_y;
    int64_t c = 0;
    if (all_f32) {
      float* out = static_cast<float*>(e.out) + r * e.ld_out;
      const float* res = e.residual ? static_cast<const float*>(e.residual) + r * e.ld_residual : nullptr;
      for (; c + W <= cols; c += W) {
        typename V::T v = activate<V>(V::load(yr + c), e.act);
        if (res) v = V::add(v, V::load(res + c));
        V::store(out + c, v);
      }
    }
    for (; c < cols; c += W) {
      const int64_t n = std::min<int64_t>(W, cols - c);
      for (int64_t j = 0; j < W; ++j) buf[j] = j < n ? yr[c + j] : 0.0f;
      V::store(buf, activate<V>(V::load(buf), e.act));
      for (int64_t j = 0; j < n; ++j) {
        float v = buf[j];
        if (e.residual) v += load_float(e.residual, e.residual_type, r * e.ld_residual + c + j);
        store_float(e.out, e.out_type, r * e.ld_out + c + j, v);
      }
    }
  }
}

// ------------------------------------------------------------------ attention core

// scores[r][jv0 W, (jv0 + JN) W) = q_r . K^T for R query rows x JN key vectors: R x JN
// accumulators, each K^T vector loaded once for R rows.
template <class V, int R, int JN>
inline void score_tile(const float* const (&qrow)[R], const float* kt, int64_t padded, int64_t d, int64_t jv0,
                       float* scores) {
  using T = typename V::T;
  constexpr int W = V::W;
  T acc[R][JN];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int jj = 0; jj < JN; ++jj) acc[r][jj] = V::set1(0.0f);
  for (int64_t c = 0; c < d; ++c) {
    T kv[JN];
#pragma GCC unroll 8
    for (int jj = 0; jj < JN; ++jj) kv[jj] = V::load(kt + c * padded + (jv0 + jj) * W);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const T qb = V::set1(qrow[r][c]);
#pragma GCC unroll 8
      for (int jj = 0; jj < JN; ++jj) acc[r][jj] = V::fma(qb, kv[jj], acc[r][jj]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int jj = 0; jj < JN; ++jj) V::store(scores + r * padded + (jv0 + jj) * W, acc[r][jj]);
}

// out_r[c0, c0 + JN W) = sum_j P[r, j] v_j for R rows: each V row vector loaded once for R rows.
template <class V, int R, int JN>
inline void value_tile(const float* scores, int64_t padded, const float* v, int64_t ld_v, int64_t keys, int64_t c0,
                       float* out, int64_t ld_out, int64_t rows) {
  using T = typename V::T;
  constexpr int W = V::W;
  T acc[R][JN];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int jj = 0; jj < JN; ++jj) acc[r][jj] = V::set1(0.0f);
  for (int64_t j = 0; j < keys; ++j) {
    T vv[JN];
#pragma GCC unroll 8
    for (int jj = 0; jj < JN; ++jj) vv[jj] = V::load(v + j * ld_v + c0 + jj * W);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const T pb = V::set1(scores[r * padded + j]);
#pragma GCC unroll 8
      for (int jj = 0; jj < JN; ++jj) acc[r][jj] = V::fma(pb, vv[jj], acc[r][jj]);
    }
  }
  for (int64_t r = 0; r < rows; ++r)
#pragma GCC unroll 8
    for (int jj = 0; jj < JN; ++jj) V::store(out + r * ld_out + c0 + jj * W, acc[r][jj]);
}

// The tile functions for a run-time count of vectors 1 <= n <= JN, each with its own register tile.
template <class V, int R, int JN>
inline void score_tiles(int64_t n, const float* const (&qrow)[R], const float* kt, int64_t padded, int64_t d,
                        int64_t jv0, float* scores) {
  if constexpr (JN > 0) {
    if (n == JN) return score_tile<V, R, JN>(qrow, kt, padded, d, jv0, scores);
    score_tiles<V, R, JN - 1>(n, qrow, kt, padded, d, jv0, scores);
  }
}

template <class V, int R, int JN>
inline void value_tiles(int64_t n, const float* scores, int64_t padded, const float* v, int64_t ld_v, int64_t keys,
                        int64_t c0, float* out, int64_t ld_out, int64_t rows) {
  if constexpr (JN > 0) {
    if (n == JN) return value_tile<V, R, JN>(scores, padded, v, ld_v, keys, c0, out, ld_out, rows);
    value_tiles<V, R, JN - 1>(n, scores, padded, v, ld_v, keys, c0, out, ld_out, rows);
  }
}

// softmax(s[0, seen) * scale + mask) in place; s[seen, end) = 0. All keys masked: zeros. `end` is a
// multiple of W: the keys past `seen` enter the vector passes as -inf, whose exp is 0, so no lane is
// done one at a time (a scalar exp costs as much as a vector one).
template <class V>
inline void softmax_row(float* s, int64_t seen, int64_t end, float scale, const float* mask) {
  using T = typename V::T;
  constexpr int W = V::W;
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  const int64_t seen_v = seen / W * W, used = (seen + W - 1) / W * W;
  for (int64_t j = seen_v; j < seen; ++j) s[j] = s[j] * scale + (mask ? mask[j] : 0.0f);
  for (int64_t j = seen; j < used; ++j) s[j] = kNegInf;
  const T vscale = V::set1(scale);
  T vmax = V::set1(kNegInf);
  for (int64_t j = 0; j < seen_v; j += W) {
    T x = V::mul(V::load(s + j), vscale);
    if (mask) x = V::add(x, V::load(mask + j));
    V::store(s + j, x);
    vmax = V::max(vmax, x);
  }
  if (used > seen_v) vmax = V::max(vmax, V::load(s + seen_v));
  const float row_max = V::hmax(vmax);
  if (row_max == kNegInf) {
    for (int64_t j = 0; j < end; ++j) s[j] = 0.0f;
    return;
  }
  const T bmax = V::set1(row_max);
  T vsum = V::set1(0.0f);
  for (int64_t j = 0; j < used; j += W) {
    const T e = V::exp(V::sub(V::load(s + j), bmax));
    V::store(s + j, e);
    vsum = V::add(vsum, e);
  }
  const T inv = V::set1(1.0f / V::hsum(vsum));
  for (int64_t j = 0; j < used; j += W) V::store(s + j, V::mul(V::load(s + j), inv));
  for (int64_t j = used; j < end; ++j) s[j] = 0.0f;
}

// One (batch, head): K transposed into scratch (keys padded to a multiple of 16 with zeros),
// then blocks of R query rows: scores for up to J key vectors at a time, a softmax per row in
// place, and P V for up to J output vectors at a time. With a causal mask a block computes only
// the keys its last row sees.
template <class V, int R, int J>
void attention_head_t(const AttentionProblem& p, int64_t b, int64_t h, float* scratch) {
  constexpr int W = V::W;
  const int64_t tokens = p.tokens, d = p.head_dim, width = p.heads * d;
  const int64_t padded = (tokens + 15) / 16 * 16;
  float* kt = scratch;               // [d][padded]
  float* scores = kt + d * padded;   // [R][padded]
  const float* base = p.qkv + b * tokens * p.ld_qkv;
  const float* q = base + h * d;
  const float* k = base + width + h * d;
  const float* v = base + 2 * width + h * d;
  bool transposed = false;
  if constexpr (W > 1) {  // W x W register blocks (padded is a multiple of 16)
    if (d % W == 0) {
      for (int64_t j0 = 0; j0 < padded; j0 += W)
        for (int64_t c0 = 0; c0 < d; c0 += W)
          V::transpose_block(k + j0 * p.ld_qkv + c0, p.ld_qkv, tokens - j0, kt + c0 * padded + j0, padded);
      transposed = true;
    }
  }
  if (!transposed) {
    for (int64_t j = 0; j < tokens; ++j)
      for (int64_t c = 0; c < d; ++c) kt[c * padded + j] = k[j * p.ld_qkv + c];
    for (int64_t c = 0; c < d; ++c)
      for (int64_t j = tokens; j < padded; ++j) kt[c * padded + j] = 0.0f;
  }
  const float* mask_bh = p.mask ? p.mask + b * p.mask_sb + h * p.mask_sh : nullptr;
  // one query row (p.rows): the same tiles with one row, so that row comes out as the whole
  // computation gives it
  const int64_t only = p.rows != nullptr ? p.rows[b] : -1;
  float* out_bh = p.out + b * (only >= 0 ? 1 : tokens) * p.ld_out + h * d;
  const int64_t d_vecs = d / W;

  for (int64_t i0 = only >= 0 ? only : 0; i0 < (only >= 0 ? only + 1 : tokens); i0 += R) {
    const int64_t rows = only >= 0 ? 1 : std::min<int64_t>(R, tokens - i0);
    // the keys any row of the block sees; one row takes its whole block's count, so that its P V sums
    // run over the same keys (the extra ones with weight 0) as the whole computation's
    const int64_t keys = !p.causal ? tokens : only >= 0 ? std::min(tokens, only / R * R + R) : i0 + rows;
    const int64_t key_vecs = (keys + W - 1) / W;
    const float* qrow[R];
    for (int r = 0; r < R; ++r) qrow[r] = q + std::min<int64_t>(i0 + r, tokens - 1) * p.ld_qkv;
    for (int64_t jv0 = 0; jv0 < key_vecs; jv0 += J)
      score_tiles<V, R, J>(std::min<int64_t>(J, key_vecs - jv0), qrow, kt, padded, d, jv0, scores);
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t i = i0 + r;
      softmax_row<V>(scores + r * padded, p.causal ? i + 1 : tokens, key_vecs * W, p.scale,
                     mask_bh ? mask_bh + i * p.mask_si : nullptr);
    }
    float* out_rows = out_bh + (only >= 0 ? 0 : i0) * p.ld_out;
    for (int64_t cv0 = 0; cv0 < d_vecs; cv0 += J)
      value_tiles<V, R, J>(std::min<int64_t>(J, d_vecs - cv0), scores, padded, v, p.ld_qkv, keys, cv0 * W, out_rows,
                           p.ld_out, rows);
    for (int64_t c = d_vecs * W; c < d; ++c)  // head widths that are not a multiple of the vector
      for (int64_t r = 0; r < rows; ++r) {
        float a = 0.0f;
        for (int64_t j = 0; j < keys; ++j) a += scores[r * padded + j] * v[j * p.ld_qkv + c];
        out_rows[r * p.ld_out + c] = a;
      }
  }
}

}  // namespace
}  // namespace pyclipq::cpu
