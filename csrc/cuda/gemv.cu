// GEMV-shaped fused linear for M <= 16 (pooled projections, text EOT tokens): the
// weight is streamed once, so the kernel is about keeping enough weight bytes in flight.
//
// A CTA is 8 warps; each warp owns one n8 tile (8 weight rows) and a K range, with
// `ksplit` warps sharing a tile (their partial sums meet in shared memory in a fixed
// order, so results are deterministic). Every M <= 16 fits one m16 MMA tile.
//
// Lane mapping: lane (g, t) loads 8 consecutive bytes (t*8..t*8+7) of a 32-byte block of
// weight row g, and uses them as b0 = bytes 0-3, b1 = bytes 4-7. In mma.m16n8k32 terms
// that pairs logical k 4t+i with byte 8t+i and k 16+4t+i with byte 8t+4+i; loading A with
// the same pairing (8 bytes of activations per row at 8t) makes the MMA compute exactly
// the 32-element dot of that block's bit-field: one 8-byte load per lane per block,
// every 32-byte sector fully used, and each MMA stays inside one quantization group.
#include <algorithm>

#include "device_utils.cuh"

namespace pyclipq::cuda {
namespace {

constexpr int kWarps = 8;
constexpr int kUnroll = 4;  // weight blocks loaded ahead per warp: loads in flight before the first use

template <int BITS, bool GROUPED>
__global__ void __launch_bounds__(kWarps * 32) gemv_kernel(const GemmArgs p, int ksplit) {
  constexpr int kCodesPerByte = 8 / BITS;
  __shared__ uint32_t partial[kWarps][32][4];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const int tiles_per_cta = kWarps / ksplit;
  const int part = warp % ksplit;
  const int n_base = (blockIdx.x * tiles_per_cta + warp / ksplit) * 8;

  const int64_t row_bytes = p.k_pad / kCodesPerByte;
  const int blocks = static_cast<int>(row_bytes / 32);
  // Split K on whole groups, so every group is corrected by exactly one warp.
  const int blocks_per_group = GROUPED ? max(1, p.group_steps / kCodesPerByte) : 1;
  int per_warp = (blocks + ksplit - 1) / ksplit;
  per_warp = (per_warp + blocks_per_group - 1) / blocks_per_group * blocks_per_group;
  const int b_begin = min(blocks, part * per_warp), b_end = min(blocks, b_begin + per_warp);

  const uint8_t* w = p.w + static_cast<int64_t>(min(n_base + g, p.n - 1)) * row_bytes + 8 * t;
  const bool lo_ok = g < p.m, hi_ok = g + 8 < p.m;
  const int8_t* a_lo = p.a + static_cast<int64_t>(g) * p.k_pad + 8 * t;
  const int8_t* a_hi = a_lo + static_cast<int64_t>(8) * p.k_pad;

  int acc[4] = {0, 0, 0, 0};
  float y[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  for (int b = b_begin; b < b_end; b += kUnroll) {
    uint2 wv[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      wv[u] = b + u < b_end ? __ldg(reinterpret_cast<const uint2*>(w + static_cast<int64_t>(b + u) * 32))
                            : make_uint2(0, 0);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (b + u >= b_end) break;
#pragma unroll
      for (int f = 0; f < kCodesPerByte; ++f) {
        const int64_t k = static_cast<int64_t>(b + u) * 32 * kCodesPerByte + f * 32;
        const uint2 xl = lo_ok ? __ldg(reinterpret_cast<const uint2*>(a_lo + k)) : make_uint2(0, 0);
        const uint2 xh = hi_ok ? __ldg(reinterpret_cast<const uint2*>(a_hi + k)) : make_uint2(0, 0);
        const uint32_t a[4] = {xl.x, xh.x, xl.y, xh.y};
        mma_s8(acc, a, decode_field<BITS>(wv[u].x, f), decode_field<BITS>(wv[u].y, f));
        if constexpr (GROUPED) {
          const int step = (b + u) * kCodesPerByte + f;
          if ((step + 1) % p.group_steps == 0) {
            const int group = step / p.group_steps;
            const int32_t xs_lo = lo_ok ? __ldg(p.sums + g * p.groups + group) : 0;
            const int32_t xs_hi = hi_ok ? __ldg(p.sums + (g + 8) * p.groups + group) : 0;
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int col = n_base + 2 * t + (e & 1);
              const float ws = col < p.n ? __ldg(p.w_scale + static_cast<int64_t>(col) * p.groups + group) : 0.0f;
              const int32_t exact = offset_correct(acc[e], p.level_mul, p.level_offset, e < 2 ? xs_lo : xs_hi);
              y[e] = fmaf(static_cast<float>(exact), ws, y[e]);
              acc[e] = 0;
            }
          }
        }
      }
    }
  }

#pragma unroll
  for (int e = 0; e < 4; ++e) partial[warp][lane][e] = GROUPED ? __float_as_uint(y[e]) : static_cast<uint32_t>(acc[e]);
  __syncthreads();
  if (part != 0) return;
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    uint32_t total_i = partial[warp][lane][e];
    float total_f = __uint_as_float(total_i);
    for (int j = 1; j < ksplit; ++j) {
      if constexpr (GROUPED) total_f += __uint_as_float(partial[warp + j][lane][e]);
      else total_i += partial[warp + j][lane][e];  // wrapping int32 sum: exact, order-free
    }
    const int row = g + 8 * (e >> 1), col = n_base + 2 * t + (e & 1);
    if (row >= p.m || col >= p.n) continue;
    float sum_g;
    if constexpr (GROUPED) {
      sum_g = total_f;
    } else {
      const int32_t xs = p.level_offset != 0 ? __ldg(p.sums + row) : 0;
      sum_g = static_cast<float>(offset_correct(static_cast<int32_t>(total_i), p.level_mul, p.level_offset, xs)) *
              __ldg(p.w_scale + col);
    }
    float v = sum_g * __ldg(p.s + row);
    if (p.bias != nullptr) v += load_as_float(p.bias, p.bias_dtype, col);
    store_from_float(p.out, p.out_dtype, static_cast<int64_t>(row) * p.n + col, v);
  }
}

template <int BITS, bool GROUPED>
void launch(const GemmArgs& p, cudaStream_t stream) {
  const int blocks = p.k_pad * BITS / 8 / 32;
  int ksplit = kWarps;  // the most warps per tile that still leaves each >= 2 blocks
  while (ksplit > 1 && blocks / ksplit < 2) ksplit /= 2;
  const int rows_per_cta = 8 * (kWarps / ksplit);
  const int ctas = (p.n + rows_per_cta - 1) / rows_per_cta;
  gemv_kernel<BITS, GROUPED><<<ctas, kWarps * 32, 0, stream>>>(p, ksplit);
}

}  // namespace

void launch_gemv(const GemmArgs& p, cudaStream_t stream) {
  if (p.m == 0 || p.n == 0) return;
  const bool grouped = p.group_steps * 32 != p.k_pad;
  switch (p.bits) {
    case 8: launch<8, false>(p, stream); break;
    case 4: grouped ? launch<4, true>(p, stream) : launch<4, false>(p, stream); break;
    default: grouped ? launch<2, true>(p, stream) : launch<2, false>(p, stream); break;
  }
}

}  // namespace pyclipq::cuda
