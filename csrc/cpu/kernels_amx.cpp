// The AMX kernel table ("amx"). Compiled with -mamx-tile -mamx-int8 and the AVX-512 flags of the
// VNNI table (see CMakeLists.txt); selected only when CPUID reports AMX-TILE and AMX-INT8, XCR0
// says the OS saves tile state, and the kernel granted this process tile data (isa.cpp).
//
// One tdpbssd multiplies a 16 x 64 int8 activation tile by a 64 x 16 int8 weight tile (VNNI-4
// order: 16 K-quads of 16 columns x 4) into a 16 x 16 int32 tile: 16384 multiply-adds, signed x
// signed. int8 weights enter as they are; a low-bit weight enters as its operand
// u = level_mul * code <= 15, and the group sums remove level_offset afterwards, as in the VNNI
// table (sum level * x = sum u * x - level_offset * sum x), so the integer GEMM ops keep their
// contract of using the x_sums they are given.
//
// int32 bound: tdpbssd adds exact products into int32 lanes, wrapping modulo 2^32; the correction
// is exact modulo 2^32 too, and the true total |sum level * x| <= 127 * 127 * K fits int32 for
// K < 133000, the limit of every table.
//
// A block is up to 32 rows x 32 columns: 2 x 2 accumulator tiles (tmm0-3) held over all of K (or
// over one scale group), 2 activation tiles (tmm4-5, straight from x_q: rows are already K-major)
// and 2 weight tiles (tmm6-7). A task runs its column range 32 columns at a time, and for each such
// panel pair every 32-row block of its rows, so the panels' weights stay in L1/L2 for all rows.
// Row tails (50 = 32 + 18 = 16 + 16 + 16 + 2) shrink the tiles' row count in the tile
// configuration; they run the same loop.
//
// Weights come either from the tile layout (GemmProblem::tile_weight, prepacked once by the layer:
// int8 tiles are read in place, low-bit tiles are decoded with a shift and a mask per 64 codes)
// or from the canonical layout, repacked per task with the VNNI table's 16 x 16 transpose.
//
// The epilogue (C tiles -> float outputs, or per-group float accumulation) runs in AVX-512 on a
// copy of the C tiles, spread over the next block's (or group's) K steps, so that it can execute
// while the tile unit multiplies. Measured (3072 x 768, M = 400, 2 threads): ~10% faster than
// running it after each block, and still a third of the op's time (the output stores most of it).
//
// Tile state is per thread and shared with other libraries in the process (oneDNN sets its own
// configuration): every task loads its configuration when it starts and releases the tiles when it
// ends; nothing is latched across tasks.
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "kernels_avx512_common.h"
#include "kernels_portable.h"

#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace pyclipq::cpu {
namespace {

// Which tasks the tiles take; the others run on the VNNI table (canonical layout, bit-identical
// results). Measured on the AMX Xeon, 2 threads, throughput against bf16 F.linear in the same run
// (3072 x 768 and 768 x 3072, benchmarks/README.md):
// * rows: int8 at M = 4 is 2.9-3.2x bf16 on tiles against 2.0-2.1x on VNNI; at M = 1-3 a tile
//   instruction costs as much as for 16 rows, and VNNI's dot tile reads the weights once.
// * scale groups: each group ends in 4 tile stores and a float pass over the block's totals. With
//   groups of 64 (one K step per group) the tiles reached 0.36-0.89x bf16 where VNNI reached
//   0.45-1.20x; of 32, 0.19-0.50x against 0.49-1.03x. Groups of 128 and per-channel scales stay on
//   the tiles (g128: 0.63-1.28x against 0.56-1.11x).
constexpr int64_t kMinTileRows = 4;
constexpr int64_t kMinTileGroupLength = 128;

bool runs_on_tiles(const GemmProblem& p, int64_t rows) {
  return rows >= kMinTileRows && p.k_pad / num_groups(p.k_pad, p.group_size) >= kMinTileGroupLength;
}

// tmm registers of a block. Macros, not constants: GCC's tile intrinsics paste the register
// number into their asm text.
#define kAcc00 0
#define kAcc01 1
#define kAcc10 2
#define kAcc11 3
#define kAct0 4
#define kAct1 5
#define kWgt0 6
#define kWgt1 7
constexpr int kBlockRows = 32, kBlockCols = 32;

// GCC's tileloadd and ldtilecfg asm statements have no memory clobber: without this, stores that
// fill a buffer (decoded weights, the tile configuration) could be scheduled after the tile
// instruction that reads it.
PQ_INLINE void compiler_memory_barrier() { asm volatile("" ::: "memory"); }

// The 64-byte operand of ldtilecfg (palette 1).
struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// The tile shapes of the current block: loaded when they change, released when the task ends.
class TileShapes {
 public:
  TileShapes() = default;
  TileShapes(const TileShapes&) = delete;
  TileShapes& operator=(const TileShapes&) = delete;
  ~TileShapes() {
    if (loaded_) _tile_release();
  }
  // rows0, rows1: rows of the first and second activation tile (rows1 = 0: one row tile).
  void set(int rows0, int rows1) {
    if (loaded_ && rows0 == rows0_ && rows1 == rows1_) return;
    TileConfig cfg;
    std::memset(&cfg, 0, sizeof cfg);
    cfg.palette_id = 1;
    auto shape = [&](int tmm, int rows, int colsb) {
      cfg.rows[tmm] = static_cast<uint8_t>(rows);
      cfg.colsb[tmm] = static_cast<uint16_t>(rows == 0 ? 0 : colsb);
    };
    shape(kAcc00, rows0, 64);
    shape(kAcc01, rows0, 64);
    shape(kAcc10, rows1, 64);
    shape(kAcc11, rows1, 64);
    shape(kAct0, rows0, kTileK);
    shape(kAct1, rows1, kTileK);
    shape(kWgt0, kTileK / 4, 64);
    shape(kWgt1, kTileK / 4, 64);
    compiler_memory_barrier();  // GCC's ldtilecfg asm declares only 8 of the 64 bytes it reads
    _tile_loadconfig(&cfg);
    loaded_ = true;
    rows0_ = rows0;
    rows1_ = rows1;
  }

 private:
  bool loaded_ = false;
  int rows0_ = 0, rows1_ = 0;
};

// ------------------------------------------------------------------ epilogues

// A block's (or one scale group's) int32 totals, stored from the C tiles, and what they become.
// Its units (row, panel) are finished in slices between the next K steps (advance).
struct PendingTotals;
struct TaskContext;
using FinishFn = void (*)(const TaskContext& cx, const PendingTotals& t, int u0, int u1);

struct PendingTotals {
  const int32_t* totals = nullptr;  // [4 tiles][16][16]: tile 2 (r / 16) + c holds rows r, panel c
  int64_t m0 = 0, n0 = 0;
  int rows = 0, panels = 0, valid = 0;  // valid: columns of the block that exist
  int64_t g = 0;
  const float* ws = nullptr;  // the column block's scales [G][kBlockCols] at this block's first column
  float* facc = nullptr;      // grouped linear: the block's float accumulators [kBlockRows][kBlockCols]
  int done = 0;               // units processed

  int units() const { return rows * panels; }
};

struct TaskContext {
  const GemmProblem& p;
  const LinearEpilogue* e;  // nullptr: the integer GEMM
  int32_t* out;             // the integer GEMM's [M, N, G]
  int64_t groups;
  int offset;               // O of the operands: 0 for int8, level_offset for the low-bit formats
  FinishFn finish;          // finish_units for this task's output type and offset
};

// Units [u0, u1): unit u is row u / panels of the block, panel u % panels. Specialized per output
// (the integer GEMM's int32, or the fused linear's float type) and offset, so that a unit is ~12
// instructions with no branch but the group's.
// The float steps are the VNNI table's (LinearSink), so both tables give bit-identical outputs:
// facc = fma(f, ws_g, facc) from 0 over the groups, then y = fma(facc, x_scale, bias); with one
// group y = fma(fma(f, ws, 0), x_scale, bias).
template <bool LINEAR, FloatType Y, bool OFFSET>
void finish_units(const TaskContext& cx, const PendingTotals& t, int u0, int u1) {
  const int64_t ldy = cx.p.N, G = cx.groups;
  for (int u = u0; u < u1; ++u) {
    const int r = t.panels == 2 ? u >> 1 : u, c = t.panels == 2 ? (u & 1) : 0;
    const __mmask16 mask = first_lanes16(t.valid - 16 * c);
    const int64_t m = t.m0 + r, n = t.n0 + 16 * c;
    __m512i acc = _mm512_load_si512(t.totals + ((r >> 4) * 2 + c) * 256 + (r & 15) * 16);
    if constexpr (OFFSET) acc = _mm512_sub_epi32(acc, _mm512_set1_epi32(cx.offset * cx.p.x_sums[m * G + t.g]));
    if constexpr (!LINEAR) {
      int32_t* dst = cx.out + (m * ldy + n) * G + t.g;
      if (G == 1) {
        _mm512_mask_storeu_epi32(dst, mask, acc);
      } else {
        const __m512i idx = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                               _mm512_set1_epi32(static_cast<int32_t>(G)));
        _mm512_mask_i32scatter_epi32(dst, mask, idx, acc, 4);
      }
    } else {
      const LinearEpilogue& e = *cx.e;
      const __m512 f = _mm512_cvtepi32_ps(acc), ws = _mm512_load_ps(t.ws + t.g * kBlockCols + 16 * c);
      __m512 sum;
      if (G == 1) {
        sum = _mm512_fmadd_ps(f, ws, _mm512_setzero_ps());
      } else {
        float* fa = t.facc + r * kBlockCols + 16 * c;
        sum = _mm512_fmadd_ps(f, ws, t.g == 0 ? _mm512_setzero_ps() : _mm512_load_ps(fa));
        if (t.g + 1 < G) {
          _mm512_store_ps(fa, sum);
          continue;
        }
      }
      const __m512 bias = e.bias ? _mm512_maskz_loadu_ps(mask, e.bias + n) : _mm512_setzero_ps();
      store16_as<Y>(e.y, m * ldy + n, _mm512_fmadd_ps(sum, _mm512_set1_ps(e.x_scale[m]), bias), mask);
    }
  }
}

template <bool OFFSET>
FinishFn finish_for(const LinearEpilogue* e) {
  if (e == nullptr) return finish_units<false, FloatType::F32, OFFSET>;
  switch (e->y_type) {
    case FloatType::BF16: return finish_units<true, FloatType::BF16, OFFSET>;
    case FloatType::F16: return finish_units<true, FloatType::F16, OFFSET>;
    default: return finish_units<true, FloatType::F32, OFFSET>;
  }
}

PQ_INLINE void advance(const TaskContext& cx, PendingTotals& t, int units) {
  const int end = std::min(t.units(), t.done + units);
  if (end > t.done) cx.finish(cx, t, t.done, end);
  t.done = end;
}

// ------------------------------------------------------------------ the block

// The K steps [s0, s1) of one block into the accumulator tiles (which the caller zeroed), with a
// slice of the pending epilogue after each step's multiplies are issued: the AVX-512 work then
// overlaps the tile unit's. a: the block's first activation row at the steps' K origin; b0, b1: its
// two weight panels at the same K ([K / 4][64] bytes each).
template <int MT, int NT>
void tile_steps(const TaskContext& cx, const int8_t* a, int64_t lda, const int8_t* b0, const int8_t* b1, int64_t s0,
                int64_t s1, PendingTotals& pending) {
  const int per_step = static_cast<int>((pending.units() - pending.done + (s1 - s0) - 1) / std::max<int64_t>(1, s1 - s0));
  for (int64_t s = s0; s < s1; ++s) {
    const int64_t ka = s * kTileK, kb = s * kTileK * 16;
    _tile_loadd(kWgt0, b0 + kb, 64);
    _tile_loadd(kAct0, a + ka, lda);
    if constexpr (NT == 2) _tile_loadd(kWgt1, b1 + kb, 64);
    _tile_dpbssd(kAcc00, kAct0, kWgt0);
    if constexpr (NT == 2) _tile_dpbssd(kAcc01, kAct0, kWgt1);
    if constexpr (MT == 2) {
      _tile_loadd(kAct1, a + 16 * lda + ka, lda);
      _tile_dpbssd(kAcc10, kAct1, kWgt0);
      if constexpr (NT == 2) _tile_dpbssd(kAcc11, kAct1, kWgt1);
    }
    if (pending.done < pending.units()) advance(cx, pending, per_step);
  }
}

template <int MT, int NT>
void zero_accumulators() {
  _tile_zero(kAcc00);
  if constexpr (NT == 2) _tile_zero(kAcc01);
  if constexpr (MT == 2) {
    _tile_zero(kAcc10);
    if constexpr (NT == 2) _tile_zero(kAcc11);
  }
}

template <int MT, int NT>
void store_accumulators(int32_t* totals) {
  _tile_stored(kAcc00, totals, 64);
  if constexpr (NT == 2) _tile_stored(kAcc01, totals + 256, 64);
  if constexpr (MT == 2) {
    _tile_stored(kAcc10, totals + 512, 64);
    if constexpr (NT == 2) _tile_stored(kAcc11, totals + 768, 64);
  }
}

// ------------------------------------------------------------------ weights

// Low-bit tile layout -> operands u = level_mul * code, [K tiles][1024] for one panel: each 64-byte
// load holds CPB tile rows (docs/FORMATS.md), one shift and one mask each.
template <WeightKind KIND>
void decode_tile_panel(const uint8_t* src, int64_t k_tiles, int8_t* dst) {
  constexpr int BITS = traits(KIND).bits, CPB = 8 / BITS, LOADS = kTileCodes / CPB / 64;
  const __m512i mask = _mm512_set1_epi8((1 << BITS) - 1);
  for (int64_t t = 0; t < k_tiles; ++t) {
#pragma GCC unroll 4
    for (int v = 0; v < LOADS; ++v) {
      const __m512i packed = _mm512_loadu_si512(src + (t * LOADS + v) * 64);
#pragma GCC unroll 4
      for (int q = 0; q < CPB; ++q) {
        __m512i code = _mm512_and_si512(_mm512_srli_epi16(packed, q * BITS), mask);
        if constexpr (traits(KIND).level_mul == 2) code = _mm512_add_epi8(code, code);
        _mm512_store_si512(dst + t * kTileCodes + (v + q * LOADS) * 64, code);
      }
    }
  }
}

struct Scratch {
  std::vector<int8_t> panels;   // the column block's operands, 2 panels of [K / 4][64] (+ alignment)
  std::vector<float> scales[2]; // a column block's w_scale as [G][kBlockCols], double-buffered
  alignas(64) int32_t totals[2][4 * 256];             // C tiles, double-buffered
  alignas(64) float facc[2][kBlockRows * kBlockCols];  // grouped float accumulators, double-buffered
};
Scratch& scratch() {
  thread_local Scratch s;
  return s;
}

PQ_INLINE int8_t* aligned64(std::vector<int8_t>& v, size_t bytes) {
  v.resize(bytes + 64);
  return reinterpret_cast<int8_t*>((reinterpret_cast<uintptr_t>(v.data()) + 63) & ~uintptr_t(63));
}

// ------------------------------------------------------------------ tasks

template <WeightKind KIND>
void run_tiles(const GemmProblem& p, const LinearEpilogue* e, int32_t* out, int64_t m0, int64_t m1, int64_t n0,
               int64_t n1) {
  const int64_t G = num_groups(p.k_pad, p.group_size), glen = p.k_pad / G;
  const int64_t steps_per_group = glen / kTileK, k_tiles = p.k_pad / kTileK;  // glen >= 128: runs_on_tiles
  const int64_t ldw = p.k_pad / codes_per_byte(KIND);
  const int64_t panel_bytes = kTileColumns * p.k_pad;  // one panel's int8 operands
  constexpr int kOffset = operand_offset<Operand::S8>(KIND);
  const TaskContext cx{p, e, out, G, kOffset, kOffset != 0 ? finish_for<true>(e) : finish_for<false>(e)};
  Scratch& sc = scratch();
  TileShapes shapes;
  PendingTotals pending;
  int totals_buf = 0, facc_buf = 0, scales_buf = 0;
  for (int64_t nb = n0; nb < n1; nb += kBlockCols) {
    const int64_t nb1 = std::min(n1, nb + kBlockCols);
    const int panels = nb1 - nb > kTileColumns ? 2 : 1;
    // the block's weight panels, as [K / 4][64] operands
    const int8_t* b[2];
    if (p.tile_weight != nullptr && KIND == WeightKind::Int8) {
      const int8_t* tw = static_cast<const int8_t*>(p.tile_weight);
      for (int c = 0; c < 2; ++c) b[c] = tw + (nb / kTileColumns + std::min(c, panels - 1)) * panel_bytes;
    } else {
      int8_t* ops = aligned64(sc.panels, 2 * panel_bytes);
      if (p.tile_weight != nullptr) {
        const uint8_t* tw = static_cast<const uint8_t*>(p.tile_weight);
        const int64_t tile_bytes = kTileCodes / codes_per_byte(KIND);
        for (int c = 0; c < panels; ++c)
          decode_tile_panel<KIND>(tw + (nb / kTileColumns + c) * k_tiles * tile_bytes, k_tiles, ops + c * panel_bytes);
      } else {
        repack_block<KIND, Operand::S8>(static_cast<const uint8_t*>(p.weight), ldw, nb, nb1, p.k_pad,
                                        reinterpret_cast<uint8_t*>(ops));
      }
      b[0] = ops;
      b[1] = ops + (panels - 1) * panel_bytes;
      compiler_memory_barrier();
    }
    // the block's scales as [G][kBlockCols] (the pending epilogue may still read the other buffer)
    float* ws = nullptr;
    if (e != nullptr) {
      scales_buf ^= 1;
      std::vector<float>& s = sc.scales[scales_buf];
      s.assign(G * kBlockCols + 16, 0.0f);
      ws = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(s.data()) + 63) & ~uintptr_t(63));
      for (int64_t n = nb; n < nb1; ++n)
        for (int64_t g = 0; g < G; ++g) ws[g * kBlockCols + n - nb] = e->w_scale[n * G + g];
    }
    for (int64_t m = m0; m < m1; m += kBlockRows) {
      const int rows = static_cast<int>(std::min<int64_t>(kBlockRows, m1 - m));
      const int rows0 = std::min(16, rows), rows1 = rows - rows0;
      shapes.set(rows0, rows1);
      facc_buf ^= 1;
      const int8_t* a = p.x_q + m * p.k_pad;
      for (int64_t g = 0; g < G; ++g) {
        const int64_t s0 = g * steps_per_group, s1 = s0 + steps_per_group;
        auto run = [&]<int MT, int NT>() {
          zero_accumulators<MT, NT>();
          tile_steps<MT, NT>(cx, a, p.k_pad, b[0], b[1], s0, s1, pending);
          advance(cx, pending, pending.units());
          store_accumulators<MT, NT>(sc.totals[totals_buf]);
        };
        if (rows1 > 0) {
          if (panels == 2) run.template operator()<2, 2>();
          else run.template operator()<2, 1>();
        } else {
          if (panels == 2) run.template operator()<1, 2>();
          else run.template operator()<1, 1>();
        }
        pending = PendingTotals{sc.totals[totals_buf], m, nb, rows, panels, static_cast<int>(nb1 - nb), g, ws,
                                sc.facc[facc_buf], 0};
        totals_buf ^= 1;
      }
    }
  }
  advance(cx, pending, pending.units());
}

void run(const GemmProblem& p, const LinearEpilogue* e, int32_t* out, int64_t m0, int64_t m1, int64_t n0,
         int64_t n1) {
  if (m0 >= m1 || n0 >= n1) return;
  switch (p.kind) {
    case WeightKind::Int8:
      return run_tiles<WeightKind::Int8>(p, e, out, m0, m1, n0, n1);
    case WeightKind::Int4:
      return run_tiles<WeightKind::Int4>(p, e, out, m0, m1, n0, n1);
    case WeightKind::Int2:
      return run_tiles<WeightKind::Int2>(p, e, out, m0, m1, n0, n1);
    case WeightKind::Ternary:
      return run_tiles<WeightKind::Ternary>(p, e, out, m0, m1, n0, n1);
  }
}

void amx_gemm(const GemmProblem& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1, int32_t* out,
              const NextColumns* next) {
  if (!runs_on_tiles(p, m1 - m0)) return avx512_vnni_kernels().gemm(p, m0, m1, n0, n1, out, next);
  run(p, nullptr, out, m0, m1, n0, n1);
}

void amx_linear(const GemmProblem& p, const LinearEpilogue& e, int64_t m0, int64_t m1, int64_t n0, int64_t n1,
                const NextColumns* next) {
  if (!runs_on_tiles(p, m1 - m0)) return avx512_vnni_kernels().linear(p, e, m0, m1, n0, n1, next);
  run(p, &e, nullptr, m0, m1, n0, n1);
}

}  // namespace

const KernelTable& amx_kernels() {
  // Activation quantization and the Hadamard rotation are the VNNI table's (AVX-512, memory-bound).
  // Tasks take up to 256 rows (weights stay in L2 while 8 blocks of rows pass) and split N in
  // multiples of a block's 32 columns; GEMV-like tasks are the VNNI table's.
  static const KernelTable table{"amx",
                                 avx512_vnni_kernels().quantize_rows,
                                 amx_gemm,
                                 amx_linear,
                                 {256, kBlockCols, avx512_vnni_kernels().tasks.min_gemv_task_bytes},
                                 avx512_vnni_kernels().hadamard,
                                 kTileLayoutAll,
                                 &avx512_block_kernels()};
  return table;
}

}  // namespace pyclipq::cpu
