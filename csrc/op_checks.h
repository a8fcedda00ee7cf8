// Argument checks shared by every backend's aten wrapper (CPU and CUDA): each error
// names the argument and what was expected.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <optional>

#include "pyclipq/formats.h"

namespace pyclipq {

inline void check_float_input(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.dim() >= 1, op, ": x must have shape [..., K], got a 0-d tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf, op,
              ": x must be float32, bfloat16 or float16, got ", x.scalar_type());
  TORCH_CHECK(x.size(-1) >= 1, op, ": x must have K = x.size(-1) >= 1, got shape ", x.sizes());
}

inline void check_group_size(int64_t group_size, const char* op) {
  TORCH_CHECK(valid_group_size(group_size), op, ": group_size must be 0 (per output channel), 32, 64 or 128, got ",
              group_size);
}

// x_q: int8 [M, K_pad] with K_pad a multiple of the K block. Returns K_pad.
inline int64_t check_quantized_activation(const at::Tensor& x_q, const char* op) {
  TORCH_CHECK(x_q.scalar_type() == at::kChar, op, ": x_q must be int8, got ", x_q.scalar_type());
  TORCH_CHECK(x_q.dim() == 2, op, ": x_q must be 2-D [M, K_pad], got shape ", x_q.sizes());
  TORCH_CHECK(x_q.is_contiguous(), op, ": x_q must be contiguous");
  TORCH_CHECK(x_q.size(1) > 0 && x_q.size(1) % kKBlock == 0, op, ": x_q must have K_pad = a positive multiple of ",
              kKBlock, " columns (see docs/FORMATS.md), got ", x_q.size(1));
  return x_q.size(1);
}

// weight: int8 [N, K_pad] (int8) or block-planar packed uint8 [N, K_pad / codes_per_byte].
inline void check_weight(WeightKind kind, const at::Tensor& weight, int64_t k_pad, const char* op) {
  const auto want = kind == WeightKind::Int8 ? at::kChar : at::kByte;
  TORCH_CHECK(weight.scalar_type() == want, op, ": weight must be ", want == at::kChar ? "int8" : "uint8 (packed codes)",
              " for format ", traits(kind).name, ", got ", weight.scalar_type());
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be 2-D [N, K_pad / codes_per_byte], got shape ", weight.sizes());
  TORCH_CHECK(weight.is_contiguous(), op, ": weight must be contiguous");
  const int64_t cpb = codes_per_byte(kind);
  TORCH_CHECK(weight.size(1) * cpb == k_pad, op, ": weight holds K_pad = ", weight.size(1) * cpb,
              " (", weight.size(1), " bytes x ", cpb, " codes) but the activation has K_pad = ", k_pad,
              " (mismatched in_features K?)");
}

inline void check_group_sums(const at::Tensor& sums, int64_t m, int64_t groups, const char* op) {
  TORCH_CHECK(sums.scalar_type() == at::kInt, op, ": x_sums must be int32, got ", sums.scalar_type());
  TORCH_CHECK(sums.dim() == 2 && sums.size(0) == m && sums.size(1) == groups, op, ": x_sums must have shape [", m,
              ", ", groups, "] (rows of x_q, weight groups), got ", sums.sizes());
  TORCH_CHECK(sums.is_contiguous(), op, ": x_sums must be contiguous");
}

inline void check_weight_scale(const at::Tensor& scale, int64_t n, int64_t groups, const char* op) {
  TORCH_CHECK(scale.scalar_type() == at::kFloat, op, ": weight_scale must be float32, got ", scale.scalar_type());
  const bool shape_ok = (scale.dim() == 1 && groups == 1 && scale.size(0) == n) ||
                        (scale.dim() == 2 && scale.size(0) == n && scale.size(1) == groups);
  TORCH_CHECK(shape_ok, op, ": weight_scale must have shape [", n, ", ", groups, "]", groups == 1 ? " or [N]" : "",
              " (N output features, G groups), got ", scale.sizes());
  TORCH_CHECK(scale.is_contiguous(), op, ": weight_scale must be contiguous");
}

inline void check_bias(const std::optional<at::Tensor>& bias, int64_t n, const char* op) {
  if (!bias.has_value()) return;
  TORCH_CHECK(bias->is_floating_point(), op, ": bias must be floating point, got ", bias->scalar_type());
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n, op, ": bias must have shape [", n, "], got ", bias->sizes());
}

inline void check_act_scale(const std::optional<at::Tensor>& act_scale, const char* op) {
  if (!act_scale.has_value()) return;
  TORCH_CHECK(act_scale->scalar_type() == at::kFloat && act_scale->numel() == 1, op,
              ": act_scale (static activation scale) must be a float32 tensor with one element, got ",
              act_scale->scalar_type(), " of shape ", act_scale->sizes());
}

inline void check_same_device(const at::Tensor& ref, const at::Tensor& other, const char* name, const char* op) {
  TORCH_CHECK(other.device() == ref.device(), op, ": ", name, " is on ", other.device(), " but x is on ", ref.device());
}

}  // namespace pyclipq
