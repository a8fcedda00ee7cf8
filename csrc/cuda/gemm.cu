// Tiled int8 tensor-core GEMM for every weight format (sm_80+: mma.sync m16n8k32 s8).
//
// A (int8 activations) and W (int8, or block-planar packed codes) stream through a
// STAGES-deep cp.async pipeline into shared memory. Low-bit codes are never expanded
// in memory: each B fragment is one 32-bit word of packed bytes per lane, decoded in
// registers (shift + mask, device_utils.cuh) straight into the MMA operand. A K tile is
// 64 weight bytes for int8 (64 K values) and 128 K values for packed formats.
//
// Groups end on 32-element steps (a step is one bit-field of one packed block); at each
// group end the int32 accumulators are offset-corrected with the activation sums and
// either stored exactly ([M, N, G] int32) or folded into fp32 with the weight scale.
#include <algorithm>

#include "device_utils.cuh"

namespace pyclipq::cuda {
namespace {

constexpr int kPad = 16;  // bytes added to each smem row, see the bank note below

template <int BITS_, int BM_, int BN_, int WARPS_M_, int WARPS_N_, int STAGES_>
struct Tile {
  static constexpr int BITS = BITS_, BM = BM_, BN = BN_, WARPS_M = WARPS_M_, WARPS_N = WARPS_N_, STAGES = STAGES_;
  static constexpr int kThreads = WARPS_M * WARPS_N * 32;
  static constexpr int kCodesPerByte = 8 / BITS;
  static constexpr int kBK = BITS == 8 ? 64 : 128;    // K elements per tile
  static constexpr int kWBytes = kBK / kCodesPerByte;  // weight bytes per row per tile
  // Row strides 80 / 144 bytes (A), 80 / 48 (W): rows g = 0..7 of a fragment start
  // 20g / 36g / 12g words apart, i.e. on distinct 4-bank groups mod 32, so the 8 rows x
  // 4 words a warp reads in one instruction (or one ldmatrix phase) are conflict-free.
  static constexpr int kAStride = kBK + kPad;
  static constexpr int kWStride = kWBytes + kPad;
  static constexpr int kABytes = BM * kAStride;
  static constexpr int kStageBytes = kABytes + BN * kWStride;
  static constexpr int kSmemBytes = STAGES * kStageBytes;
  static constexpr int kWM = BM / WARPS_M, kWN = BN / WARPS_N;
  static constexpr int kMT = kWM / 16, kNT = kWN / 8;
  static constexpr int kSteps = kBK / 32;  // 32-element MMA steps per tile
  static_assert(kWM % 16 == 0 && kWN % 8 == 0, "warp tile must be whole m16n8 fragments");
};

template <class T>
__device__ __forceinline__ void load_tile(uint8_t* stage, const GemmArgs& p, int m0, int n0, int kt) {
  uint8_t* as = stage;
  uint8_t* ws = stage + T::kABytes;
  constexpr int kAChunks = T::kBK / 16;  // 16-byte copies per A row
  const int64_t a_col = static_cast<int64_t>(kt) * T::kBK;
  for (int i = threadIdx.x; i < T::BM * kAChunks; i += T::kThreads) {
    const int r = i / kAChunks, c = i % kAChunks;
    const bool ok = m0 + r < p.m;
    const int8_t* src = ok ? p.a + static_cast<int64_t>(m0 + r) * p.k_pad + a_col + c * 16 : p.a;
    cp_async16(as + r * T::kAStride + c * 16, src, ok);
  }
  constexpr int kWChunks = T::kWBytes / 16;
  const int64_t row_bytes = static_cast<int64_t>(p.k_pad) / T::kCodesPerByte;
  const int64_t w_col = static_cast<int64_t>(kt) * T::kWBytes;
  for (int i = threadIdx.x; i < T::BN * kWChunks; i += T::kThreads) {
    const int r = i / kWChunks, c = i % kWChunks;
    const bool ok = n0 + r < p.n;
    const uint8_t* src = ok ? p.w + static_cast<int64_t>(n0 + r) * row_bytes + w_col + c * 16 : p.w;
    cp_async16(ws + r * T::kWStride + c * 16, src, ok);
  }
}

// What the kernel writes: exact int32 groups, or the fused float epilogue with per-group
// folding (int4/int2 with group_size > 0: fp32 partials live through the K loop) or
// once at the end (one group per row: no fp32 partials, 64 fewer live registers).
enum Mode : int { kInt32 = 0, kFusedGrouped = 1, kFusedChannel = 2 };

// Fragment coordinates of this lane: rows (of A / out) and columns (of W / out).
struct Lane {
  int g, t;  // lane / 4, lane % 4
};

template <class T, int MODE>
__device__ __forceinline__ void finish_group(int (&acc)[T::kMT][T::kNT][4],
                                             float (&y)[T::kMT][T::kNT][MODE == kFusedGrouped ? 4 : 1],
                                             const GemmArgs& p, int row0, int col0, Lane l, int group) {
#pragma unroll
  for (int mt = 0; mt < T::kMT; ++mt) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = row0 + mt * 16 + l.g + 8 * h;
      const bool row_ok = row < p.m;
      const int32_t xs = (p.level_offset != 0 && row_ok) ? __ldg(p.sums + static_cast<int64_t>(row) * p.groups + group) : 0;
#pragma unroll
      for (int nt = 0; nt < T::kNT; ++nt) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int col = col0 + nt * 8 + 2 * l.t + e;
          int& a = acc[mt][nt][2 * h + e];
          const int32_t exact = offset_correct(a, p.level_mul, p.level_offset, xs);
          if constexpr (MODE == kFusedGrouped) {
            const float wsc = col < p.n ? __ldg(p.w_scale + static_cast<int64_t>(col) * p.groups + group) : 0.0f;
            y[mt][nt][2 * h + e] = fmaf(static_cast<float>(exact), wsc, y[mt][nt][2 * h + e]);
          } else if (row_ok && col < p.n) {
            static_cast<int32_t*>(p.out)[(static_cast<int64_t>(row) * p.n + col) * p.groups + group] = exact;
          }
          a = 0;
        }
      }
    }
  }
}

template <class T, int MODE>
__global__ void __launch_bounds__(T::kThreads) gemm_kernel(const GemmArgs p) {
  extern __shared__ __align__(16) uint8_t smem[];
  const int tiles_n = (p.n + T::BN - 1) / T::BN;
  // Walk 8 row-tiles per column band so that their weight tiles are reused from L2.
  const int tiles_m = (p.m + T::BM - 1) / T::BM;
  constexpr int kGroupM = 8;
  const int per_group = kGroupM * tiles_n;
  const int first_m = (blockIdx.x / per_group) * kGroupM;
  const int rows_in_group = min(tiles_m - first_m, kGroupM);
  const int tile_m = first_m + (blockIdx.x % per_group) % rows_in_group;
  const int tile_n = (blockIdx.x % per_group) / rows_in_group;
  const int m0 = tile_m * T::BM, n0 = tile_n * T::BN;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wm = warp / T::WARPS_N, wn = warp % T::WARPS_N;
  const Lane l{lane / 4, lane % 4};
  const int row0 = m0 + wm * T::kWM, col0 = n0 + wn * T::kWN;

  int acc[T::kMT][T::kNT][4] = {};
  float y[T::kMT][T::kNT][MODE == kFusedGrouped ? 4 : 1] = {};
  const int k_tiles = p.k_pad / T::kBK;

#pragma unroll
  for (int s = 0; s < T::STAGES - 1; ++s) {
    if (s < k_tiles) load_tile<T>(smem + s * T::kStageBytes, p, m0, n0, s);
    cp_async_commit();
  }
  for (int kt = 0; kt < k_tiles; ++kt) {
    cp_async_wait<T::STAGES - 2>();
    __syncthreads();  // tile kt landed for every thread; tile kt-1's buffer is free
    const int next = kt + T::STAGES - 1;
    if (next < k_tiles) load_tile<T>(smem + (next % T::STAGES) * T::kStageBytes, p, m0, n0, next);
    cp_async_commit();

    const uint8_t* as = smem + (kt % T::STAGES) * T::kStageBytes;
    const uint8_t* ws = as + T::kABytes;
#pragma unroll
    for (int step = 0; step < T::kSteps; ++step) {
      uint32_t a[T::kMT][4];
#pragma unroll
      for (int mt = 0; mt < T::kMT; ++mt) {
        const int r = wm * T::kWM + mt * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
        ldmatrix_x4(a[mt], as + r * T::kAStride + step * 32 + (lane >> 4) * 16);
      }
      const int block = step / T::kCodesPerByte, field = step % T::kCodesPerByte;
#pragma unroll
      for (int nt = 0; nt < T::kNT; ++nt) {
        const uint8_t* wrow = ws + (wn * T::kWN + nt * 8 + l.g) * T::kWStride + block * 32 + 4 * l.t;
        const uint32_t b0 = decode_field<T::BITS>(*reinterpret_cast<const uint32_t*>(wrow), field);
        const uint32_t b1 = decode_field<T::BITS>(*reinterpret_cast<const uint32_t*>(wrow + 16), field);
#pragma unroll
        for (int mt = 0; mt < T::kMT; ++mt) mma_s8(acc[mt][nt], a[mt], b0, b1);
      }
      if constexpr (MODE != kFusedChannel) {
        const int global_step = kt * T::kSteps + step;
        if ((global_step + 1) % p.group_steps == 0)
          finish_group<T, MODE>(acc, y, p, row0, col0, l, global_step / p.group_steps);
      }
    }
  }
  cp_async_wait<0>();

  if constexpr (MODE != kInt32) {
#pragma unroll
    for (int mt = 0; mt < T::kMT; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = row0 + mt * 16 + l.g + 8 * h;
        if (row >= p.m) continue;
        const float s = __ldg(p.s + row);
        const int32_t xs = (MODE == kFusedChannel && p.level_offset != 0) ? __ldg(p.sums + row) : 0;
#pragma unroll
        for (int nt = 0; nt < T::kNT; ++nt)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int col = col0 + nt * 8 + 2 * l.t + e;
            if (col >= p.n) continue;
            float sum_g;  // sum_g w_scale[n, g] * acc_g, in the reference's order
            if constexpr (MODE == kFusedGrouped) {
              sum_g = y[mt][nt][2 * h + e];
            } else {
              const int32_t exact = offset_correct(acc[mt][nt][2 * h + e], p.level_mul, p.level_offset, xs);
              sum_g = static_cast<float>(exact) * __ldg(p.w_scale + col);
            }
            float v = sum_g * s;
            if (p.bias != nullptr) v += load_as_float(p.bias, p.bias_dtype, col);
            store_from_float(p.out, p.out_dtype, static_cast<int64_t>(row) * p.n + col, v);
          }
      }
  }
}

template <class T, int MODE>
void launch_tile(const GemmArgs& p, cudaStream_t stream) {
  // Above 48 KB a kernel must opt in to its dynamic shared memory (once per kernel; the
  // launch right after reports a failure here as a launch error).
  static const cudaError_t attr =
      cudaFuncSetAttribute(gemm_kernel<T, MODE>, cudaFuncAttributeMaxDynamicSharedMemorySize, T::kSmemBytes);
  (void)attr;
  const int tiles = ((p.m + T::BM - 1) / T::BM) * ((p.n + T::BN - 1) / T::BN);
  gemm_kernel<T, MODE><<<tiles, T::kThreads, T::kSmemBytes, stream>>>(p);
}

template <int BITS, int MODE>
void launch_mode(const GemmArgs& p, cudaStream_t stream) {
  // 128x128 tiles (8 warps of 64x32) once they fill the GPU; 64x64 (4 warps of 32x32)
  // otherwise. The exact int32 output (a building block, not the hot path) keeps to the
  // small tile: its per-group stores would spill at 64x32 per warp.
  const int64_t big_tiles = static_cast<int64_t>((p.m + 127) / 128) * ((p.n + 127) / 128);
  if constexpr (MODE != kInt32) {
    if (p.m > 64 && big_tiles >= 100) return launch_tile<Tile<BITS, 128, 128, 2, 4, 4>, MODE>(p, stream);
  }
  launch_tile<Tile<BITS, 64, 64, 2, 2, 4>, MODE>(p, stream);
}

template <int BITS>
void launch_bits(const GemmArgs& p, cudaStream_t stream) {
  if (p.out_dtype == DType::I32) return launch_mode<BITS, kInt32>(p, stream);
  if constexpr (BITS != 8) {
    if (p.group_steps * 32 != p.k_pad) return launch_mode<BITS, kFusedGrouped>(p, stream);
  }
  launch_mode<BITS, kFusedChannel>(p, stream);
}

}  // namespace

void launch_gemm(const GemmArgs& p, cudaStream_t stream) {
  if (p.m == 0 || p.n == 0) return;
  switch (p.bits) {
    case 8: launch_bits<8>(p, stream); break;
    case 4: launch_bits<4>(p, stream); break;
    default: launch_bits<2>(p, stream); break;
  }
}

}  // namespace pyclipq::cuda
