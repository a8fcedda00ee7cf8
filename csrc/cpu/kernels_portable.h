// Portable C++ kernels (no intrinsics). kernels_scalar.cpp instantiates them as the
// always-built fallback. Everything here has internal linkage: a TU compiled with other
// ISA flags that includes this file gets its own copy, so no AVX2 code can leak into
// the scalar table through the linker picking one inline definition (ODR).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "pyclipq/cpu_kernels.h"

namespace pyclipq::cpu {
namespace {

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// IEEE binary16 -> binary32, exact (every half is a float).
inline float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000) << 16;
  const uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ff;
  if (exp == 0x1f) return bits_to_float(sign | 0x7f800000u | (man << 13));
  if (exp != 0) return bits_to_float(sign | ((exp + 112) << 23) | (man << 13));
  const float sub = std::ldexp(static_cast<float>(man), -24);  // zero or subnormal
  return sign ? -sub : sub;
}

// binary32 -> binary16 with round-half-to-even, like torch's c10::Half conversion.
inline uint16_t float_to_half(float f) {
  const uint32_t u = float_to_bits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000);
  const float a = std::fabs(f);
  if (std::isnan(f)) return sign | 0x7e00;
  if (a >= 65520.0f) return sign | 0x7c00;  // rounds to infinity
  if (a < 6.103515625e-05f) {               // subnormal half: multiples of 2^-24
    return sign | static_cast<uint16_t>(std::nearbyintf(a * 16777216.0f));
  }
  const uint32_t au = float_to_bits(a);
  const uint32_t exp = (au >> 23) - 112, man = au & 0x7fffff;
  uint32_t h = (exp << 10) | (man >> 13);
  const uint32_t rest = man & 0x1fff;
  if (rest > 0x1000 || (rest == 0x1000 && (h & 1))) ++h;  // may carry into the exponent: still right
  return sign | static_cast<uint16_t>(h);
}

// binary32 -> bfloat16 with round-half-to-even and quiet NaN, the rule c10::BFloat16 uses.
inline uint16_t float_to_bf16(float f) {
  if (std::isnan(f)) return 0x7fc0;
  const uint32_t u = float_to_bits(f);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// fn(std::integral_constant<FloatType, T>{}) for the run-time element type t: how a table turns
// a row kernel templated on its element type into the QuantizeRowsFn of its table.
template <class Fn>
inline auto with_float_type(FloatType t, Fn&& fn) {
  switch (t) {
    case FloatType::BF16:
      return fn(std::integral_constant<FloatType, FloatType::BF16>{});
    case FloatType::F16:
      return fn(std::integral_constant<FloatType, FloatType::F16>{});
    default:
      return fn(std::integral_constant<FloatType, FloatType::F32>{});
  }
}

inline float load_float(const void* base, FloatType t, int64_t i) {
  switch (t) {
    case FloatType::BF16:
      return bits_to_float(uint32_t(static_cast<const uint16_t*>(base)[i]) << 16);
    case FloatType::F16:
      return half_to_float(static_cast<const uint16_t*>(base)[i]);
    default:
      return static_cast<const float*>(base)[i];
  }
}

inline void store_float(void* base, FloatType t, int64_t i, float v) {
  switch (t) {
    case FloatType::BF16:
      static_cast<uint16_t*>(base)[i] = float_to_bf16(v);
      break;
    case FloatType::F16:
      static_cast<uint16_t*>(base)[i] = float_to_half(v);
      break;
    default:
      static_cast<float*>(base)[i] = v;
  }
}

inline int8_t round_to_int8(float v) {
  // nearbyintf in the default rounding mode is round-half-to-even, like torch.round.
  float r = std::nearbyintf(v);
  r = std::min(127.0f, std::max(-127.0f, r));
  return static_cast<int8_t>(r);
}

// The activation scale rule of docs/FORMATS.md, shared by every ISA so they agree bit for bit.
struct RowScale {
  float scale, inv;
};
inline RowScale row_scale(float amax, const float* static_scale) {
  if (static_scale != nullptr) return {*static_scale, 1.0f / *static_scale};
  return {amax / 127.0f, amax >= kActMinAbsmax ? 127.0f / amax : 0.0f};
}

int64_t portable_quantize_rows(const void* x, FloatType x_type, int64_t ldx, int64_t rows, int64_t k, int64_t k_pad,
                               int64_t group_size, const float* static_scale, int8_t* q, float* scale,
                               int32_t* sums) {
  const int64_t groups = num_groups(k_pad, group_size);
  const int64_t group_len = k_pad / groups;
  int64_t bad_row = -1;
  for (int64_t r = 0; r < rows; ++r) {
    int8_t* qr = q + r * k_pad;
    float amax = 0.0f;
    bool finite = true;
    for (int64_t i = 0; i < k; ++i) {
      const float a = std::fabs(load_float(x, x_type, r * ldx + i));
      finite &= a <= std::numeric_limits<float>::max();
      amax = a > amax ? a : amax;
    }
    if (!finite && bad_row < 0) bad_row = r;
    const RowScale rs = row_scale(amax, static_scale);
    scale[r] = rs.scale;
    for (int64_t i = 0; i < k; ++i) qr[i] = round_to_int8(load_float(x, x_type, r * ldx + i) * rs.inv);
    std::memset(qr + k, 0, static_cast<size_t>(k_pad - k));
    for (int64_t g = 0; g < groups; ++g) {
      int32_t sum = 0;
      for (int64_t i = g * group_len; i < (g + 1) * group_len; ++i) sum += qr[i];
      sums[r * groups + g] = sum;
    }
  }
  return bad_row;
}

// Code of element k in a block-planar packed row (docs/FORMATS.md).
inline int packed_code(const uint8_t* row, int64_t k, int bits) {
  const int64_t per_byte = 8 / bits;
  const int64_t block = kVectorBytes * per_byte;
  const int64_t b = k / block, r = k % block;
  const int64_t plane = r / kVectorBytes, j = r % kVectorBytes;
  return (row[b * kVectorBytes + j] >> (plane * bits)) & ((1 << bits) - 1);
}

// Exact int32 sum of level(w[n, k]) * x_q[k] over k in [k0, k1) for one weight row.
// Unsigned codes times int8 stay far from int32 overflow: |sum| <= 15 * 127 * K < 2^31 for K < 1.1M.
inline int32_t portable_dot(WeightKind kind, const int8_t* xq, int32_t group_sum, int64_t k0, int64_t k1,
                            const void* weight_row) {
  if (kind == WeightKind::Int8) {
    const int8_t* w = static_cast<const int8_t*>(weight_row);
    int32_t s = 0;
    for (int64_t i = k0; i < k1; ++i) s += int32_t(w[i]) * int32_t(xq[i]);
    return s;
  }
  const FormatTraits& t = traits(kind);
  const uint8_t* w = static_cast<const uint8_t*>(weight_row);
  int32_t raw = 0;
  for (int64_t i = k0; i < k1; ++i) raw += packed_code(w, i, t.bits) * int32_t(xq[i]);
  return t.level_mul * raw - t.level_offset * group_sum;
}

inline const void* weight_row(WeightKind kind, const void* weight, int64_t n, int64_t k_pad) {
  return static_cast<const uint8_t*>(weight) + n * (k_pad / codes_per_byte(kind));
}

void portable_gemm(const GemmProblem& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1, int32_t* out,
                   const NextColumns*) {
  const int64_t groups = num_groups(p.k_pad, p.group_size);
  const int64_t glen = p.k_pad / groups;
  for (int64_t m = m0; m < m1; ++m)
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t g = 0; g < groups; ++g)
        out[(m * p.N + n) * groups + g] =
            portable_dot(p.kind, p.x_q + m * p.k_pad, p.x_sums ? p.x_sums[m * groups + g] : 0, g * glen,
                         (g + 1) * glen, weight_row(p.kind, p.weight, n, p.k_pad));
}

void portable_linear(const GemmProblem& p, const LinearEpilogue& e, int64_t m0, int64_t m1, int64_t n0,
                     int64_t n1, const NextColumns*) {
  const int64_t groups = num_groups(p.k_pad, p.group_size);
  const int64_t glen = p.k_pad / groups;
  for (int64_t m = m0; m < m1; ++m) {
    for (int64_t n = n0; n < n1; ++n) {
      float sum = 0.0f;
      for (int64_t g = 0; g < groups; ++g)
        sum += e.w_scale[n * groups + g] *
               static_cast<float>(portable_dot(p.kind, p.x_q + m * p.k_pad, p.x_sums[m * groups + g], g * glen,
                                               (g + 1) * glen, weight_row(p.kind, p.weight, n, p.k_pad)));
      float v = sum * e.x_scale[m];
      if (e.bias != nullptr) v += e.bias[n];
      store_float(e.y, e.y_type, m * p.N + n, v);
    }
  }
}

// HadamardFn, portable: the butterflies in memory (stages of h >= the vector width vectorise).
void portable_hadamard(const float* x, float* y, int64_t rows, int64_t k, int64_t block) {
  const float norm = 1.0f / std::sqrt(static_cast<float>(block));
  for (int64_t r = 0; r < rows; ++r) {
    float* yr = y + r * k;
    if (yr != x + r * k) std::memcpy(yr, x + r * k, static_cast<size_t>(k) * sizeof(float));
    for (int64_t b0 = 0; b0 < k; b0 += block) {
      float* v = yr + b0;
      for (int64_t h = 1; h < block; h *= 2)
        for (int64_t i = 0; i < block; i += 2 * h)
          for (int64_t j = i; j < i + h; ++j) {
            const float a = v[j], c = v[j + h];
            v[j] = a + c;
            v[j + h] = a - c;
          }
      for (int64_t j = 0; j < block; ++j) v[j] *= norm;
    }
  }
}

}  // namespace
}  // namespace pyclipq::cpu
