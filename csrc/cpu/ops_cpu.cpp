// CPU implementations of the pyclipq ops (schemas: pyclipq/ops/library.py).
// This file checks, allocates and splits work across threads; the arithmetic lives in
// the torch-free kernel tables (kernels_*.cpp) chosen at run time.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <string>
#include <iterator>
#include <utility>
#include <vector>

#include "op_checks.h"
#include "op_entry_points.h"
#include "pyclipq/cpu_kernels.h"

// at::parallel_for is a header template: with torch's OpenMP backend it only runs in parallel
// when this file itself is compiled with -fopenmp (else INTRA_OP_PARALLEL is undefined and every
// op runs on one thread). The OpenMP runtime it links is torch's bundled libgomp (RUNPATH).
#if AT_PARALLEL_OPENMP && !defined(_OPENMP)
#pragma message("pyclipq: ops_cpu.cpp is compiled without -fopenmp, so the CPU ops will use a single thread")
#endif

namespace pyclipq::cpu {

int parallel_width() {
  // Enough one-element tasks that every pool thread takes one: the widest thread index seen.
  std::atomic<int> widest{1};
  at::parallel_for(0, 64 * at::get_num_threads(), 1, [&](int64_t, int64_t) {
    const int width = at::get_thread_num() + 1;
    for (int cur = widest.load(); width > cur && !widest.compare_exchange_weak(cur, width);) {
    }
  });
  return widest.load();
}

namespace {

constexpr int64_t kRowsPerTask = 16;

struct QuantizedActivation {
  at::Tensor q, scale, sums;
};

constexpr c10::DeviceType kCPU = c10::DeviceType::CPU;

FloatType float_type(at::ScalarType t) {
  return t == at::kBFloat16 ? FloatType::BF16 : t == at::kHalf ? FloatType::F16 : FloatType::F32;
}

// Per-token quantization of m rows of k values in tasks of kRowsPerTask rows: rows_of(r0, r1,
// scratch) gives the task's rows (a pointer with row stride k and their FloatType), read from the
// input as they are or computed into `scratch` (LayerNorm). The first row holding NaN/Inf, whichever
// task finds one first, is an error that ends with `what_failed`.
template <typename RowsOf>
QuantizedActivation quantize_in_tasks(int64_t m, int64_t k, int64_t group_size,
                                      const std::optional<at::Tensor>& act_scale, const at::TensorOptions& options,
                                      const char* op, const char* what_failed, RowsOf&& rows_of) {
  const int64_t k_pad = padded_k(k);
  const int64_t groups = num_groups(k_pad, group_size);
  QuantizedActivation out{at::empty({m, k_pad}, options.dtype(at::kChar)), at::empty({m}, options.dtype(at::kFloat)),
                          at::empty({m, groups}, options.dtype(at::kInt))};
  float static_scale = 0.0f;
  if (act_scale.has_value()) {
    static_scale = act_scale->item<float>();
    TORCH_CHECK(std::isfinite(static_scale) && static_scale > 0.0f, op,
                ": act_scale must be finite and > 0 (was the layer calibrated?), got ", static_scale);
  }
  const KernelTable& kt = active_kernels();
  std::atomic<int64_t> bad_row{-1};
  int8_t* qp = out.q.data_ptr<int8_t>();
  float* sp = out.scale.data_ptr<float>();
  int32_t* gp = out.sums.data_ptr<int32_t>();
  at::parallel_for(0, m, kRowsPerTask, [&](int64_t r0, int64_t r1) {
    thread_local std::vector<float> scratch;  // grown once per thread: a fresh vector cost a malloc and a memset per task
    const auto [rows, type] = rows_of(r0, r1, scratch);
    const int64_t bad = kt.quantize_rows(rows, type, k, r1 - r0, k, k_pad, group_size,
                                         act_scale.has_value() ? &static_scale : nullptr, qp + r0 * k_pad, sp + r0,
                                         gp + r0 * groups);
    if (bad >= 0) {  // report the first bad row whichever task finds one first
      int64_t cur = bad_row.load();
      while ((cur < 0 || r0 + bad < cur) && !bad_row.compare_exchange_weak(cur, r0 + bad)) {
      }
    }
  });
  TORCH_CHECK(bad_row.load() < 0, op, ": x contains NaN or Inf (row ", bad_row.load(), " of the flattened input)",
              what_failed);
  return out;
}

QuantizedActivation quantize(const at::Tensor& x, int64_t group_size, const std::optional<at::Tensor>& act_scale,
                             const char* op) {
  check_quantize_args(kCPU, x, group_size, act_scale, op);
  const int64_t k = x.size(-1);
  const int64_t m = x.numel() / k;
  // The kernels read fp32, bf16 and fp16 rows directly; non-contiguous inputs are copied first.
  const at::Tensor rows = x.reshape({m, k}).contiguous();
  const FloatType xt = float_type(rows.scalar_type());
  const char* xp = static_cast<const char*>(rows.data_ptr());
  const int64_t row_bytes = k * rows.element_size();
  return quantize_in_tasks(m, k, group_size, act_scale, x.options(), op,
                           "; per-token quantization needs finite activations",
                           [&](int64_t r0, int64_t, std::vector<float>&) {
                             return std::pair<const void*, FloatType>{xp + r0 * row_bytes, xt};
                           });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_per_token(const at::Tensor& x, int64_t group_size,
                                                                  const std::optional<at::Tensor>& act_scale) {
  auto r = quantize(x, group_size, act_scale, "pyclipq.quantize_per_token");
  return {r.q, r.scale, r.sums};
}

// The (M, N) work is cut into tasks of whole rows x a multiple of the table's column tile, which
// the pool's threads take from a shared counter: a thread slowed by another process on its core
// takes fewer tasks. Every output element is computed by exactly one task with the same
// instruction sequence whatever the tile it falls in, so results do not depend on the number of
// threads. M >= 8: for tables that pack activations per row tile (TaskShape::max_rows == 0),
// rows in multiples of the 8-row register tile, about 8 tasks per thread (each task packs its
// rows' activations once; a task's weights stay in L2/L3), N split too only when there are too
// few row chunks; for tables that repack weights per task, up to max_rows rows per task and N
// split into about 8 tasks per thread. M < 8 (GEMV-like, weights from DRAM): split N only, with
// >= TaskShape::min_gemv_task_bytes of weights per task.
template <typename Fn>
void for_each_task(const TaskShape& shape, int64_t m, int64_t n, int64_t row_bytes, Fn&& fn) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  if (m == 0 || n == 0) return;
  const int64_t target = 8 * threads;
  int64_t m_chunk = m, n_tasks = target;
  if (m >= 8 && shape.max_rows == 0) {
    m_chunk = 8 * ((m + 8 * target - 1) / (8 * target));
    const int64_t m_tasks = (m + m_chunk - 1) / m_chunk;
    n_tasks = m_tasks >= target / 2 ? 1 : (target / 2 + m_tasks - 1) / m_tasks;
  } else if (m >= 8) {
    const int64_t m_tasks = (m + shape.max_rows - 1) / shape.max_rows;
    m_chunk = (m + m_tasks - 1) / m_tasks;
    n_tasks = (target + m_tasks - 1) / m_tasks;
  } else {
    n_tasks = std::min(target, std::max<int64_t>(1, n * row_bytes / shape.min_gemv_task_bytes));
  }
  const int64_t col = shape.col_multiple;
  const int64_t n_chunk =
      std::min((n + col - 1) / col * col, std::max(col, ((n + n_tasks - 1) / n_tasks + col - 1) / col * col));
  const int64_t m_tasks = (m + m_chunk - 1) / m_chunk;
  const int64_t tasks = m_tasks * ((n + n_chunk - 1) / n_chunk);
  const int64_t nt_count = (n + n_chunk - 1) / n_chunk;
  // A thread claims its next task before it runs the current one, so the kernel knows which
  // columns come next and can prefetch their weights (the balancing stays dynamic: a thread
  // holds at most one claimed task that it has not started).
  std::atomic<int64_t> counter{0};
  auto work = [&] {
    int64_t t = counter.fetch_add(1, std::memory_order_relaxed);
    while (t < tasks) {
      const int64_t after = counter.fetch_add(1, std::memory_order_relaxed);
      const int64_t mt = t / nt_count, nt = t % nt_count, nt_after = after % nt_count;
      const NextColumns next_cols{nt_after * n_chunk, std::min(n, (nt_after + 1) * n_chunk)};
      fn(mt * m_chunk, std::min(m, (mt + 1) * m_chunk), nt * n_chunk, std::min(n, (nt + 1) * n_chunk),
         after < tasks ? &next_cols : nullptr);
      t = after;
    }
  };
  if (tasks == 1 || threads == 1) return work();
  at::parallel_for(0, std::min(threads, tasks), 1, [&](int64_t, int64_t) { work(); });
}

int64_t weight_row_bytes(WeightKind kind, int64_t k_pad) { return k_pad / codes_per_byte(kind); }

at::Tensor integer_gemm(WeightKind kind, const at::Tensor& x_q, const at::Tensor& x_sums, const at::Tensor& weight,
                        int64_t group_size, bool grouped_output, const char* op) {
  const GemmShape s = check_integer_gemm_args(kCPU, kind, x_q, x_sums, weight, group_size, op);
  const int64_t m = s.m, n = s.n, k_pad = s.k_pad, groups = s.groups;
  at::Tensor out = at::empty({m, n, groups}, x_q.options().dtype(at::kInt));
  const KernelTable& kt = active_kernels();
  const GemmProblem p{kind, m, n, k_pad, group_size, x_q.data_ptr<int8_t>(),
                      kind == WeightKind::Int8 ? nullptr : x_sums.data_ptr<int32_t>(), weight.data_ptr()};
  int32_t* outp = out.data_ptr<int32_t>();
  for_each_task(kt.tasks, m, n, weight_row_bytes(kind, k_pad),
                [&](int64_t m0, int64_t m1, int64_t n0, int64_t n1, const NextColumns* next) {
                  kt.gemm(p, m0, m1, n0, n1, outp, next);
                });
  return grouped_output ? out : out.view({m, n});
}

// What a linear does after its GEMM besides scales and bias: an activation, a residual added,
// and the output dtype (the kernel's own epilogue writes fp32 into `y`, or straight into the
// output when nothing follows).
struct AfterGemm {
  Activation act = Activation::None;
  at::Tensor residual;  // [M, N] contiguous, or undefined
  at::ScalarType out_dtype = at::kFloat;
};

// y [M, N] = (x_q W^T) * scales + bias, then `after` per task on the tile it just wrote (still
// in cache), for quantized activations `a`.
at::Tensor run_linear(WeightKind kind, const QuantizedActivation& a, const at::Tensor& weight,
                      const at::Tensor& weight_scale, int64_t group_size, int64_t k_pad,
                      const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& tile_weight,
                      const AfterGemm& after, const at::TensorOptions& options) {
  const int64_t m = a.q.size(0), n = weight.size(0);
  at::Tensor bias_f32 = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const KernelTable& kt = active_kernels();
  const bool extra = after.act != Activation::None || after.residual.defined();
  const bool post = extra && !kt.epilogue_ops_in_kernel;  // a pass over each finished tile
  at::Tensor y = at::empty({m, n}, options.dtype(after.out_dtype));
  // the kernel's own epilogue writes the output dtype when nothing follows it; else fp32 first
  at::Tensor y_kernel = !post || after.out_dtype == at::kFloat ? y : at::empty({m, n}, options.dtype(at::kFloat));
  const GemmProblem p{kind,
                      m,
                      n,
                      k_pad,
                      group_size,
                      a.q.data_ptr<int8_t>(),
                      a.sums.data_ptr<int32_t>(),
                      weight.data_ptr(),
                      tile_weight.has_value() && kt.reads_tile_layout(kind) ? tile_weight->data_ptr() : nullptr};
  LinearEpilogue e{a.scale.data_ptr<float>(), weight_scale.data_ptr<float>(),
                   bias_f32.defined() ? bias_f32.data_ptr<float>() : nullptr, y_kernel.data_ptr(),
                   float_type(y_kernel.scalar_type())};
  if (extra && !post) {
    e.act = after.act;
    if (after.residual.defined()) {
      e.residual = after.residual.data_ptr();
      e.residual_type = float_type(after.residual.scalar_type());
    }
  }
  const RowsEpilogue re{after.act,
                        after.residual.defined() ? after.residual.data_ptr() : nullptr,
                        after.residual.defined() ? float_type(after.residual.scalar_type()) : FloatType::F32,
                        n,
                        y.data_ptr(),
                        float_type(y.scalar_type()),
                        n};
  const float* y32 = post ? y_kernel.data_ptr<float>() : nullptr;
  const size_t out_bytes = y.element_size(), res_bytes = after.residual.defined() ? after.residual.element_size() : 0;
  for_each_task(kt.tasks, m, n, weight_row_bytes(kind, k_pad),
                [&](int64_t m0, int64_t m1, int64_t n0, int64_t n1, const NextColumns* next) {
                  kt.linear(p, e, m0, m1, n0, n1, next);
                  if (!post) return;
                  RowsEpilogue tile = re;
                  const int64_t offset = m0 * n + n0;
                  tile.out = static_cast<char*>(re.out) + offset * out_bytes;
                  if (re.residual) tile.residual = static_cast<const char*>(re.residual) + offset * res_bytes;
                  kt.block->epilogue_rows(y32 + offset, n, m1 - m0, n1 - n0, tile);
                });
  return y;
}

at::Tensor fused_linear(WeightKind kind, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& weight_scale,
                        int64_t group_size, const std::optional<at::Tensor>& bias,
                        const std::optional<at::Tensor>& act_scale, const std::optional<at::Tensor>& tile_weight,
                        const char* op) {
  const GemmShape shape = check_fused_linear_args(kCPU, kind, x, weight, weight_scale, group_size, bias, tile_weight, op);
  QuantizedActivation a = quantize(x, group_size, act_scale, op);
  AfterGemm after;
  after.out_dtype = x.scalar_type();  // written in x's dtype by the kernel itself
  at::Tensor y = run_linear(kind, a, weight, weight_scale, group_size, shape.k_pad, bias, tile_weight, after, x.options());
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = shape.n;
  return y.view(out_shape);
}

// ---------------------------------------------------------------- transformer-block ops

WeightKind kind_from_name(const std::string& name, const char* op) {
  for (size_t k = 0; k < std::size(kTraits); ++k)
    if (name == kTraits[k].name) return static_cast<WeightKind>(k);
  TORCH_CHECK(false, op, ": format must be one of int8, int4, int2, ternary, got '", name, "'");
}

Activation activation_from_name(const std::string& name, const char* op) {
  if (name == "none") return Activation::None;
  if (name == "gelu") return Activation::Gelu;
  if (name == "quick_gelu") return Activation::QuickGelu;
  TORCH_CHECK(false, op, ": activation must be 'none', 'gelu' (erf form) or 'quick_gelu', got '", name, "'");
}

// An optional per-channel float32 vector of length k (LayerNorm weight or bias), contiguous.
at::Tensor channel_vector(const std::optional<at::Tensor>& t, int64_t k, const at::Tensor& x, const char* name,
                          const char* op) {
  if (!t.has_value()) return at::Tensor();
  check_beside(x, *t, kCPU, name, op);
  TORCH_CHECK(t->is_floating_point() && t->dim() == 1 && t->size(0) == k, op, ": ", name,
              " must be a floating-point vector of x's K = ", k, " channels, got ", t->scalar_type(), " of shape ",
              t->sizes());
  return t->to(at::kFloat).contiguous();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_quantize(const at::Tensor& x,
                                                                   const std::optional<at::Tensor>& weight,
                                                                   const std::optional<at::Tensor>& bias, double eps,
                                                                   int64_t group_size, int64_t rotation_block,
                                                                   const std::optional<at::Tensor>& act_scale) {
  const char* op = "pyclipq.layer_norm_quantize";
  check_quantize_args(kCPU, x, group_size, act_scale, op);
  const int64_t k = x.size(-1), m = x.numel() / k;
  TORCH_CHECK(eps > 0 && std::isfinite(eps), op, ": eps must be finite and > 0, got ", eps);
  TORCH_CHECK(rotation_block >= 1 && (rotation_block & (rotation_block - 1)) == 0 && k % rotation_block == 0, op,
              ": rotation_block must be 1 (none) or a power of 2 dividing K = ", k, ", got ", rotation_block);
  const at::Tensor w = channel_vector(weight, k, x, "weight", op), b = channel_vector(bias, k, x, "bias", op);
  const at::Tensor rows = x.reshape({m, k}).to(at::kFloat).contiguous();
  const KernelTable& kt = active_kernels();
  const float* xp = rows.data_ptr<float>();
  const float* wp = w.defined() ? w.data_ptr<float>() : nullptr;
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  // the task's rows normalized (and rotated) into a buffer that stays in L1/L2, then quantized
  QuantizedActivation out = quantize_in_tasks(
      m, k, group_size, act_scale, x.options(), op, ", or its LayerNorm does",
      [&](int64_t r0, int64_t r1, std::vector<float>& buf) {
        buf.resize((r1 - r0) * k);
        for (int64_t r = r0; r < r1; ++r)
          kt.block->layer_norm_row(xp + r * k, k, wp, bp, static_cast<float>(eps), buf.data() + (r - r0) * k);
        if (rotation_block > 1) kt.hadamard(buf.data(), buf.data(), r1 - r0, k, rotation_block);
        return std::pair<const void*, FloatType>{buf.data(), FloatType::F32};
      });
  return {out.q, out.scale, out.sums};
}

at::Tensor quantized_linear(const at::Tensor& x_q, const at::Tensor& x_scale, const at::Tensor& x_sums,
                            const at::Tensor& weight, const at::Tensor& weight_scale, c10::string_view format,
                            int64_t group_size, const std::optional<at::Tensor>& bias,
                            const std::optional<at::Tensor>& tile_weight, c10::string_view activation,
                            const std::optional<at::Tensor>& residual, std::optional<at::ScalarType> out_dtype) {
  const char* op = "pyclipq.quantized_linear";
  const WeightKind kind = kind_from_name(std::string(format), op);
  const GemmShape s = check_integer_gemm_args(kCPU, kind, x_q, x_sums, weight, group_size, op);
  if (kind == WeightKind::Int8) {  // the fused path reads the row sums for int8 too
    check_beside(x_q, x_sums, kCPU, "x_sums", op);
    check_group_sums(x_sums, s.m, s.groups, op);
  }
  check_beside(x_q, x_scale, kCPU, "x_scale", op);
  TORCH_CHECK(x_scale.scalar_type() == at::kFloat && x_scale.dim() == 1 && x_scale.size(0) == s.m &&
                  x_scale.is_contiguous(),
              op, ": x_scale must be a contiguous float32 [M] = [", s.m, "] vector of row scales, got ",
              x_scale.scalar_type(), " of shape ", x_scale.sizes());
  check_linear_epilogue_args(kCPU, kind, x_q, weight_scale, bias, tile_weight, s, op);
  AfterGemm after;
  after.act = activation_from_name(std::string(activation), op);
  after.out_dtype = out_dtype.value_or(at::kFloat);
  TORCH_CHECK(after.out_dtype == at::kFloat || after.out_dtype == at::kBFloat16 || after.out_dtype == at::kHalf, op,
              ": out_dtype must be float32, bfloat16 or float16, got ", after.out_dtype);
  if (residual.has_value()) {
    check_beside(x_q, *residual, kCPU, "residual", op);
    TORCH_CHECK(residual->scalar_type() == at::kFloat || residual->scalar_type() == at::kBFloat16 ||
                    residual->scalar_type() == at::kHalf,
                op, ": residual must be float32, bfloat16 or float16, got ", residual->scalar_type());
    TORCH_CHECK(residual->dim() >= 1 && residual->size(-1) == s.n && residual->numel() == s.m * s.n, op,
                ": residual must hold [M, N] = [", s.m, ", ", s.n, "] elements with N last, got shape ",
                residual->sizes());
    after.residual = residual->reshape({s.m, s.n}).contiguous();
  }
  const QuantizedActivation a{x_q, x_scale, x_sums};
  return run_linear(kind, a, weight, weight_scale, group_size, s.k_pad, bias, tile_weight, after, x_q.options());
}

at::Tensor attention(const at::Tensor& qkv_in, int64_t num_heads, const std::optional<at::Tensor>& mask_in,
                     bool causal, std::optional<double> scale, const std::optional<at::Tensor>& rows_in) {
  const char* op = "pyclipq.attention";
  check_device_type(qkv_in, kCPU, "qkv", op);
  TORCH_CHECK(qkv_in.scalar_type() == at::kFloat, op, ": qkv must be float32, got ", qkv_in.scalar_type());
  TORCH_CHECK(qkv_in.dim() == 3, op, ": qkv must be 3-D [B, T, 3 * embed_dim], got shape ", qkv_in.sizes());
  TORCH_CHECK(num_heads >= 1 && qkv_in.size(2) > 0 && qkv_in.size(2) % (3 * num_heads) == 0, op,
              ": qkv's last dimension must be 3 * num_heads * head_dim, got ", qkv_in.size(2), " for num_heads = ",
              num_heads);
  const at::Tensor qkv = qkv_in.contiguous();
  const int64_t batch = qkv.size(0), tokens = qkv.size(1), width = qkv.size(2) / 3, head_dim = width / num_heads;
  at::Tensor mask;
  int64_t sb = 0, sh = 0, si = 0;
  if (mask_in.has_value()) {
    check_beside(qkv, *mask_in, kCPU, "mask", op);
    TORCH_CHECK(mask_in->scalar_type() == at::kFloat, op,
                ": mask must be an additive float32 mask (convert bool masks first), got ", mask_in->scalar_type());
    const auto& ms = mask_in->sizes();
    const bool two_d = mask_in->dim() == 2 && ms[0] == tokens && ms[1] == tokens;
    const bool four_d = mask_in->dim() == 4 && (ms[0] == 1 || ms[0] == batch) && (ms[1] == 1 || ms[1] == num_heads) &&
                        ms[2] == tokens && ms[3] == tokens;
    TORCH_CHECK(two_d || four_d, op, ": mask must be [T, T] or [B or 1, heads or 1, T, T] with T = ", tokens,
                ", B = ", batch, ", heads = ", num_heads, ", got shape ", ms);
    mask = mask_in->contiguous();
    si = tokens;
    if (four_d) {
      sh = ms[1] == 1 ? 0 : tokens * tokens;
      sb = ms[0] == 1 ? 0 : ms[1] * tokens * tokens;
    }
  }
  at::Tensor rows;
  if (rows_in.has_value()) {
    check_beside(qkv, *rows_in, kCPU, "rows", op);
    TORCH_CHECK(rows_in->scalar_type() == at::kLong && rows_in->dim() == 1 && rows_in->size(0) == batch, op,
                ": rows must be int64 [B] with B = ", batch, ", got ", rows_in->scalar_type(), " of shape ", rows_in->sizes());
    rows = rows_in->contiguous();
    TORCH_CHECK(batch == 0 || (rows.min().item<int64_t>() >= 0 && rows.max().item<int64_t>() < tokens), op,
                ": rows must be query rows in [0, T) with T = ", tokens);
  }
  at::Tensor out = at::empty({batch, rows.defined() ? 1 : tokens, width}, qkv.options());
  TORCH_CHECK(!scale.has_value() || std::isfinite(*scale), op, ": scale must be finite, got ", scale.value_or(0.0));
  const float sc = scale.has_value() ? static_cast<float>(*scale) : 1.0f / std::sqrt(static_cast<float>(head_dim));
  const AttentionProblem p{qkv.data_ptr<float>(), batch, tokens, num_heads, head_dim, 3 * width, sc,
                           mask.defined() ? mask.data_ptr<float>() : nullptr, sb, sh, si, causal,
                           out.data_ptr<float>(), width, rows.defined() ? rows.data_ptr<int64_t>() : nullptr};
  const KernelTable& kt = active_kernels();
  const int64_t scratch = attention_scratch_floats(tokens, head_dim);
  at::parallel_for(0, batch * num_heads, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> buf(scratch);
    for (int64_t t = t0; t < t1; ++t) kt.block->attention_head(p, t / num_heads, t % num_heads, buf.data());
  });
  return out;
}

// ---------------------------------------------------------------- input rotation

at::Tensor hadamard_rotate(const at::Tensor& x, int64_t block) {
  const char* op = "pyclipq.hadamard_rotate";
  TORCH_CHECK(x.is_floating_point(), op, ": x must be a floating-point tensor, got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) > 0, op, ": x must have a non-empty last dimension, got shape ", x.sizes());
  TORCH_CHECK(block >= 1 && (block & (block - 1)) == 0, op, ": block must be a power of 2 >= 1, got ", block);
  TORCH_CHECK(x.size(-1) % block == 0, op, ": x's last dimension (", x.size(-1), ") must be a multiple of block (",
              block, ")");
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  at::Tensor y = at::empty_like(xf);
  const int64_t k = xf.size(-1), rows = xf.numel() / k;
  const KernelTable& kt = active_kernels();
  const float* src = xf.data_ptr<float>();
  float* dst = y.data_ptr<float>();
  // memory-bound: tasks of at least 64 KiB of rows
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / k), [&](int64_t r0, int64_t r1) {
    kt.hadamard(src + r0 * k, dst + r0 * k, r1 - r0, k, block);
  });
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

// ---------------------------------------------------------------- packing

at::Tensor pack_codes(const at::Tensor& codes_in, int64_t bits) {
  const char* op = "pyclipq.pack_codes";
  const int64_t per_byte = codes_per_byte_for_bits(bits, op);
  check_codes(codes_in, (1 << bits) - 1, kCPU, op);
  const at::Tensor codes = codes_in.contiguous();
  const int64_t n = codes.size(0), k_pad = codes.size(1);
  check_k_blocks(k_pad, "codes", op);
  at::Tensor out = at::empty({n, k_pad / per_byte}, codes.options());
  const uint8_t* src = codes.data_ptr<uint8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  const int64_t row_bytes = k_pad / per_byte, block = kVectorBytes * per_byte;
  at::parallel_for(0, n, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t b = 0; b < k_pad / block; ++b)
        for (int64_t j = 0; j < kVectorBytes; ++j) {
          uint8_t v = 0;
          for (int64_t p = 0; p < per_byte; ++p) v |= src[r * k_pad + b * block + p * kVectorBytes + j] << (p * bits);
          dst[r * row_bytes + b * kVectorBytes + j] = v;
        }
  });
  return out;
}

at::Tensor unpack_codes(const at::Tensor& packed_in, int64_t bits) {
  const char* op = "pyclipq.unpack_codes";
  const int64_t per_byte = codes_per_byte_for_bits(bits, op);
  check_packed_bytes(packed_in, kCPU, op);
  const at::Tensor packed = packed_in.contiguous();
  const int64_t n = packed.size(0), row_bytes = packed.size(1), k_pad = row_bytes * per_byte;
  check_k_blocks(k_pad, "packed", op);
  at::Tensor out = at::empty({n, k_pad}, packed.options());
  const uint8_t* src = packed.data_ptr<uint8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  const int64_t block = kVectorBytes * per_byte, mask = (1 << bits) - 1;
  at::parallel_for(0, n, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t b = 0; b < k_pad / block; ++b)
        for (int64_t p = 0; p < per_byte; ++p)  // plane-major: contiguous 32-byte runs vectorize
          for (int64_t j = 0; j < kVectorBytes; ++j)
            dst[r * k_pad + b * block + p * kVectorBytes + j] =
                (src[r * row_bytes + b * kVectorBytes + j] >> (p * bits)) & mask;
  });
  return out;
}

at::Tensor pack_trits(const at::Tensor& codes_in, int64_t k) {
  const char* op = "pyclipq.pack_trits";
  check_pack_trits_args(codes_in, k, kCPU, op);
  const at::Tensor codes = codes_in.contiguous();
  const int64_t n = codes.size(0), width = codes.size(1), nbytes = (k + kTritsPerByte - 1) / kTritsPerByte;
  at::Tensor out = at::empty({n, nbytes}, codes.options());
  const uint8_t* src = codes.data_ptr<uint8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  at::parallel_for(0, n, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t j = 0; j < nbytes; ++j) {
        int v = 0;
        for (int i = kTritsPerByte - 1; i >= 0; --i) {
          const int64_t idx = j * kTritsPerByte + i;
          v = v * 3 + (idx < k ? src[r * width + idx] : traits(WeightKind::Ternary).pad_code);
        }
        dst[r * nbytes + j] = static_cast<uint8_t>(v);
      }
  });
  return out;
}

at::Tensor unpack_trits(const at::Tensor& packed_in, int64_t k) {
  const char* op = "pyclipq.unpack_trits";
  check_unpack_trits_args(packed_in, k, kCPU, op);
  const int64_t nbytes = packed_in.size(1);
  const at::Tensor packed = packed_in.contiguous();
  const int64_t n = packed.size(0), k_pad = padded_k(k);
  at::Tensor out = at::full({n, k_pad}, traits(WeightKind::Ternary).pad_code, packed.options());
  const uint8_t* src = packed.data_ptr<uint8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  at::parallel_for(0, n, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t j = 0; j < nbytes; ++j) {
        int v = src[r * nbytes + j];
        for (int i = 0; i < kTritsPerByte; ++i, v /= 3) {
          const int64_t idx = j * kTritsPerByte + i;
          if (idx < k) dst[r * k_pad + idx] = static_cast<uint8_t>(v % 3);
        }
      }
  });
  return out;
}

// A pre-LN transformer block whose four linears share one format and per-token dynamic
// quantization without input transforms, as one op: the nine calls of FusedBlock's chain
// (nn/fused_block.py) made here in C++, the same functions with the same arguments, so the result
// is the chain's bit for bit. Per call, each of those ops cost ~6-9 us of dispatch and Python
// around the kernel: ~70 us a block, 5-8% of a ViT-B/32 tower at batch 1.
// norms: ln_1 weight, bias, ln_2 weight, bias. linears: (weight, weight_scale, bias, tile_weight)
// for q|k|v, out_proj, fc1 and fc2 in that order.
at::Tensor transformer_block(const at::Tensor& x, const std::vector<std::optional<at::Tensor>>& norms, double eps_1,
                             double eps_2, const std::vector<std::optional<at::Tensor>>& linears,
                             c10::string_view format, int64_t group_size, int64_t num_heads,
                             const std::optional<at::Tensor>& mask, bool causal, c10::string_view activation) {
  const char* op = "pyclipq.transformer_block";
  TORCH_CHECK(x.dim() == 3, op, ": x must be 3-D [B, T, embed_dim], got shape ", x.sizes());
  TORCH_CHECK(norms.size() == 4, op, ": norms must be 4 tensors or None (ln_1 weight, bias, ln_2 weight, bias), got ",
              norms.size());
  TORCH_CHECK(linears.size() == 16, op,
              ": linears must be 16 entries, (weight, weight_scale, bias, tile_weight) for q|k|v, out_proj, fc1 and "
              "fc2, got ", linears.size());
  for (int i = 0; i < 4; ++i)
    TORCH_CHECK(linears[4 * i].has_value() && linears[4 * i + 1].has_value(), op, ": linears[", 4 * i, "] and [",
                4 * i + 1, "] (the weight and weight_scale of linear ", i, ") must be tensors, got None");
  const int64_t batch = x.size(0), tokens = x.size(1), width = x.size(2);
  // An inner op's error names its own arguments: say which step of the block it came from.
  auto step = [&](const char* name, auto&& run) {
    try {
      return run();
    } catch (const c10::Error& e) {
      TORCH_CHECK(false, op, ": in ", name, ": ", e.what_without_backtrace());
      throw;  // not reached: TORCH_CHECK(false) throws
    }
  };
  static constexpr const char* kLinearNames[4] = {"the q|k|v linear (linears[0:4])", "out_proj (linears[4:8])",
                                                   "fc1 (linears[8:12])", "fc2 (linears[12:16])"};
  auto linear = [&](int i, const std::tuple<at::Tensor, at::Tensor, at::Tensor>& q, c10::string_view act,
                    const std::optional<at::Tensor>& residual) {
    const auto& [x_q, x_scale, x_sums] = q;
    return step(kLinearNames[i], [&] {
      return quantized_linear(x_q, x_scale, x_sums, *linears[4 * i], *linears[4 * i + 1], format, group_size,
                              linears[4 * i + 2], linears[4 * i + 3], act, residual,
                              residual.has_value() ? std::optional<at::ScalarType>(x.scalar_type()) : std::nullopt);
    });
  };
  auto norm = [&](const char* name, const at::Tensor& t, int i, double eps) {
    return step(name, [&] { return layer_norm_quantize(t, norms[i], norms[i + 1], eps, group_size, 1, std::nullopt); });
  };
  auto quantize = [&](const char* name, const at::Tensor& t) {
    return step(name, [&] { return quantize_per_token(t, group_size, std::nullopt); });
  };
  const at::Tensor input = x.contiguous();
  const at::Tensor qkv = linear(0, norm("ln_1 (norms[0:2], eps_1)", input, 0, eps_1), "none", std::nullopt);
  TORCH_CHECK(qkv.size(-1) == 3 * width, op, ": the q|k|v linear must have 3 * embed_dim = ", 3 * width,
              " outputs, got ", qkv.size(-1));
  const at::Tensor attended =
      step("attention", [&] {
        return attention(qkv.view({batch, tokens, 3 * width}), num_heads, mask, causal, std::nullopt, std::nullopt);
      });
  const at::Tensor h = linear(1, quantize("the quantization of the attention's output", attended), "none", input);
  const at::Tensor hidden = linear(2, norm("ln_2 (norms[2:4], eps_2)", h, 2, eps_2), activation, std::nullopt);
  return linear(3, quantize("the quantization of fc1's output", hidden), "none", h).view({batch, tokens, width});
}

}  // namespace

TORCH_LIBRARY_IMPL(pyclipq, CPU, m) {
  m.impl("quantize_per_token", &quantize_per_token);
  register_format_ops<FormatEntryPoints<&integer_gemm, &fused_linear>>(m);
  m.impl("pack_codes", &pack_codes);
  m.impl("unpack_codes", &unpack_codes);
  m.impl("pack_trits", &pack_trits);
  m.impl("unpack_trits", &unpack_trits);
  m.impl("hadamard_rotate", &hadamard_rotate);
  m.impl("layer_norm_quantize", &layer_norm_quantize);
  m.impl("quantized_linear", &quantized_linear);
  m.impl("attention", &attention);
  m.impl("transformer_block", &transformer_block);
}

}  // namespace pyclipq::cpu
