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

#include "pyclipq/cpu_kernels.h"

namespace pyclipq::cpu {
namespace {

inline int8_t round_to_int8(float v) {
  // nearbyintf in the default rounding mode is round-half-to-even, like torch.round.
  float r = std::nearbyintf(v);
  r = std::min(127.0f, std::max(-127.0f, r));
  return static_cast<int8_t>(r);
}

int64_t portable_quantize_rows(const float* x, int64_t ldx, int64_t rows, int64_t k, int64_t k_pad,
                               int64_t group_size, const float* static_scale, int8_t* q, float* scale,
                               int32_t* sums) {
  const int64_t groups = num_groups(k_pad, group_size);
  const int64_t group_len = k_pad / groups;
  int64_t bad_row = -1;
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * ldx;
    int8_t* qr = q + r * k_pad;
    float amax = 0.0f;
    bool finite = true;
    for (int64_t i = 0; i < k; ++i) {
      const float a = std::fabs(xr[i]);
      finite &= a <= std::numeric_limits<float>::max();
      amax = a > amax ? a : amax;
    }
    if (!finite && bad_row < 0) bad_row = r;
    float inv, s;
    if (static_scale != nullptr) {
      s = *static_scale;
      inv = 1.0f / s;
    } else {
      s = amax / 127.0f;
      inv = amax > 0.0f ? 127.0f / amax : 0.0f;
    }
    scale[r] = s;
    for (int64_t i = 0; i < k; ++i) qr[i] = round_to_int8(xr[i] * inv);
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

void portable_gemm(WeightKind kind, const int8_t* x_q, const int32_t* x_sums, int64_t M, int64_t k_pad,
                   int64_t group_size, const void* weight, int64_t n0, int64_t n1, int64_t N, int32_t* out) {
  const int64_t groups = num_groups(k_pad, group_size);
  const int64_t glen = k_pad / groups;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t g = 0; g < groups; ++g)
        out[(m * N + n) * groups + g] = portable_dot(kind, x_q + m * k_pad, x_sums ? x_sums[m * groups + g] : 0, g * glen,
                                                     (g + 1) * glen, weight_row(kind, weight, n, k_pad));
}

void portable_linear(WeightKind kind, const int8_t* x_q, const float* x_scale, const int32_t* x_sums, int64_t M,
                     int64_t k_pad, int64_t group_size, const void* weight, const float* w_scale, const float* bias,
                     int64_t n0, int64_t n1, int64_t N, float* y) {
  const int64_t groups = num_groups(k_pad, group_size);
  const int64_t glen = k_pad / groups;
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = n0; n < n1; ++n) {
      float sum = 0.0f;
      for (int64_t g = 0; g < groups; ++g)
        sum += w_scale[n * groups + g] * static_cast<float>(portable_dot(kind, x_q + m * k_pad, x_sums[m * groups + g],
                                                                         g * glen, (g + 1) * glen,
                                                                         weight_row(kind, weight, n, k_pad)));
      float v = sum * x_scale[m];
      if (bias != nullptr) v += bias[n];
      y[m * N + n] = v;
    }
  }
}

}  // namespace
}  // namespace pyclipq::cpu
