// Torch-free CPU kernel interface. One table per ISA variant (scalar, avx2, ...);
// csrc/cpu/isa.cpp picks one at run time. The aten wrappers in ops_cpu.cpp do the
// argument checks, allocation and thread split, and call these on (M, N) tiles of work.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "pyclipq/formats.h"

namespace pyclipq::cpu {

// Element types of float activations and fused-linear outputs.
enum class FloatType : int { F32 = 0, BF16 = 1, F16 = 2 };

enum class Activation : int { None = 0, Gelu = 1, QuickGelu = 2 };  // GELU: the erf form; QuickGELU: x sigmoid(1.702 x)

// Quantize `rows` rows of x (element type x_type, row stride ldx elements, K valid columns)
// to int8 [rows, k_pad]. static_scale == nullptr: dynamic per-token scale. Writes scale[rows]
// and the group sums sums[rows, G]. Returns the index of the first row holding NaN/Inf, or -1.
using QuantizeRowsFn = int64_t (*)(const void* x, FloatType x_type, int64_t ldx, int64_t rows, int64_t k,
                                   int64_t k_pad, int64_t group_size, const float* static_scale, int8_t* q,
                                   float* scale, int32_t* sums);

// The integer part every GEMM and fused linear shares: quantized activations against the
// weights in their canonical layout (docs/FORMATS.md; the kernels read it as stored, no repack).
struct GemmProblem {
  WeightKind kind;
  int64_t M, N, k_pad, group_size;
  const int8_t* x_q;      // [M, k_pad]
  const int32_t* x_sums;  // [M, G] group sums of x_q (may be nullptr for int8)
  const void* weight;     // int8 [N, k_pad] or block-planar packed uint8 [N, k_pad / codes_per_byte]
  // The same weights in the AMX tile layout (docs/FORMATS.md, "Tile layout"), or nullptr. Only
  // tables whose KernelTable::reads_tile_layout(kind) holds read it; the others (and tasks a table runs on the
  // canonical layout, e.g. too few rows for tiles) read `weight`.
  const void* tile_weight = nullptr;
};

// The columns the calling thread will work on next (its next task), or nullptr: a table may
// prefetch their weights while it computes, so that a task's first weights do not wait on DRAM.
struct NextColumns {
  int64_t n0, n1;
};

// Integer GEMM on the tile m0 <= m < m1, n0 <= n < n1:
// out[m, n, g] = sum_{k in g} level(w[n, k]) * x_q[m, k] (exact int32), out is [M, N, G].
using GemmFn = void (*)(const GemmProblem& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1, int32_t* out,
                        const NextColumns* next);

// What a fused linear adds to the GEMM: y[m, n] = x_scale[m] * sum_g w_scale[n, g] * acc[m, n, g]
// + bias[n], written as y_type into y [M, N] (row stride N). bias may be nullptr.
struct LinearEpilogue {
  const float* x_scale;  // [M]
  const float* w_scale;  // [N, G]
  const float* bias;     // [N] or nullptr
  void* y;
  FloatType y_type;
  // Then y = act(y) + residual[m, n] (row stride N), in fp32 before the output's rounding; only
  // for tables with KernelTable::epilogue_ops_in_kernel (the others get None / nullptr here and
  // the caller applies them to each finished tile: BlockKernels::epilogue_rows).
  Activation act = Activation::None;
  const void* residual = nullptr;
  FloatType residual_type = FloatType::F32;
};

using LinearFn = void (*)(const GemmProblem& p, const LinearEpilogue& e, int64_t m0, int64_t m1, int64_t n0,
                          int64_t n1, const NextColumns* next);

// How the aten wrapper cuts the (M, N) work of a GEMM or fused linear into tasks for a table.
struct TaskShape {
  // 0: about 8 row tasks per thread, in multiples of 8 rows (tables that pack activations per
  // row tile); else tasks take up to this many rows and split N instead (tables that repack
  // weights per task, so every row of a task reuses the repacked columns).
  int64_t max_rows;
  int64_t col_multiple;  // a task's columns are a multiple of this (the table's column tile)
  // M < 8: the least weight bytes worth a task of its own (smaller layers run on fewer threads:
  // a task's fixed costs, the fork and the first lines' latency, outweigh its share)
  int64_t min_gemv_task_bytes;
};

// y[r] = x[r] times diag(H_b, ..., H_b) for `rows` rows of k floats (row stride k; y may be x):
// the orthonormal Sylvester-Hadamard rotation of each block of `block` (a power of 2 dividing k)
// channels, as a fast Walsh-Hadamard transform (log2(block) butterfly stages, then 1/sqrt(block)).
using HadamardFn = void (*)(const float* x, float* y, int64_t rows, int64_t k, int64_t block);

// ------------------------------------------------------------------ the ops around the linears
// A transformer block's float work between its GEMMs (csrc/cpu/block_kernels.h, one copy per ISA).

// y[0, k) = LayerNorm(x[0, k)) with optional affine weight and bias (nullptr: 1 and 0); y may be x.
using LayerNormRowFn = void (*)(const float* x, int64_t k, const float* weight, const float* bias, float eps, float* y);

// out[r, c] = act(y[r, c]) + residual[r, c] for `rows` x `cols` elements (row strides ld_*), out
// written as out_type; residual (read as residual_type) may be nullptr; out may be y (fp32).
struct RowsEpilogue {
  Activation act;
  const void* residual;
  FloatType residual_type;
  int64_t ld_residual;
  void* out;
  FloatType out_type;
  int64_t ld_out;
};
using EpilogueRowsFn = void (*)(const float* y, int64_t ld_y, int64_t rows, int64_t cols, const RowsEpilogue& e);

// Multi-head self-attention on the packed projections of one layer: qkv [B, T, 3 H d] (row
// stride ld_qkv floats, q | k | v, head h at columns h d), out [B, T, H d] (row stride ld_out):
// out_h = softmax(q_h k_h^T * scale + mask [+ causal]) v_h. mask: additive, element [b, h, i, j] at
// mask[b * mask_sb + h * mask_sh + i * mask_si + j] (a stride 0 broadcasts), or nullptr. A row
// whose keys are all masked gets zeros.
struct AttentionProblem {
  const float* qkv;
  int64_t batch, tokens, heads, head_dim, ld_qkv;
  float scale;
  const float* mask;
  int64_t mask_sb, mask_sh, mask_si;
  bool causal;
  float* out;
  int64_t ld_out;
  // rows[b]: the one query row of sequence b to compute, written as row 0 of out's sequence b
  // (out [B, 1, E]); nullptr: every row (out [B, T, E])
  const int64_t* rows = nullptr;
};
// Floats of scratch one (b, h) task needs.
inline int64_t attention_scratch_floats(int64_t tokens, int64_t head_dim) {
  const int64_t padded = (tokens + 15) / 16 * 16;
  return padded * (head_dim + 8) + 64;
}
using AttentionHeadFn = void (*)(const AttentionProblem& p, int64_t b, int64_t h, float* scratch);

struct BlockKernels {
  const char* isa;
  LayerNormRowFn layer_norm_row;
  EpilogueRowsFn epilogue_rows;
  AttentionHeadFn attention_head;
};

const BlockKernels& scalar_block_kernels();
#if defined(__x86_64__) || defined(_M_X64)
const BlockKernels& avx2_block_kernels();
const BlockKernels& avx512_block_kernels();
#endif

inline constexpr unsigned kTileLayoutInt8 = 1u << static_cast<int>(WeightKind::Int8);
inline constexpr unsigned kTileLayoutAll = 0xFu;

struct KernelTable {
  const char* isa;
  QuantizeRowsFn quantize_rows;
  GemmFn gemm;
  LinearFn linear;
  TaskShape tasks;
  HadamardFn hadamard;
  // The formats whose GemmProblem::tile_weight saves this table work (bit k: WeightKind k):
  // callers that keep weights for many calls (QuantLinear) prepack them into the tile layout once.
  unsigned tile_layout_kinds = 0;
  bool reads_tile_layout(WeightKind kind) const { return (tile_layout_kinds >> static_cast<int>(kind)) & 1u; }
  // LayerNorm, epilogues and the attention core at this table's vector width.
  const BlockKernels* block = nullptr;
  // Whether `linear` applies LinearEpilogue::act and ::residual itself, in registers.
  bool epilogue_ops_in_kernel = false;
};

const KernelTable& scalar_kernels();
#if defined(__x86_64__) || defined(_M_X64)
const KernelTable& avx2_kernels();
const KernelTable& avx512_vnni_kernels();
const KernelTable& amx_kernels();
#endif

// The table chosen at run time (CPUID + XGETBV, and for AMX the kernel's permission to use tile
// state; overridable with PYCLIPQ_CPU_ISA=scalar|avx2|avx512_vnni|amx).
const KernelTable& active_kernels();
const char* cpu_isa_reason();
// The tables this CPU and OS can run, best first (what PYCLIPQ_CPU_ISA may force).
std::vector<std::string> supported_isas();
// How many threads the CPU ops' work split really runs on (ops_cpu.cpp): at most
// at::get_num_threads(); 1 when the ops were built without their threading backend.
int parallel_width();

}  // namespace pyclipq::cpu
