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

// A backend's kernel reads every tensor argument from its own device type.
inline void check_device_type(const at::Tensor& t, c10::DeviceType type, const char* name, const char* op) {
  // the message arguments are evaluated only when the check fails
  TORCH_CHECK(t.device().type() == type, op, ": ", name, " must be a ", c10::DeviceTypeName(type), " tensor for the ",
              c10::DeviceTypeName(type), " kernel, got ", t.device());
}

// On `type`, and on the same device as `ref` (x or x_q).
inline void check_beside(const at::Tensor& ref, const at::Tensor& t, c10::DeviceType type, const char* name,
                         const char* op) {
  check_device_type(t, type, name, op);
  check_same_device(ref, t, name, op);
}

// ---------------------------------------------------------------- whole-op contracts

inline void check_quantize_args(c10::DeviceType type, const at::Tensor& x, int64_t group_size,
                                const std::optional<at::Tensor>& act_scale, const char* op) {
  check_float_input(x, op);
  check_device_type(x, type, "x", op);
  check_group_size(group_size, op);
  check_act_scale(act_scale, op);
  if (act_scale.has_value()) check_beside(x, *act_scale, type, "act_scale", op);
}

struct GemmShape {
  int64_t m, n, k_pad, groups;
};

// x_sums is read (and checked) only for the low-bit formats.
inline GemmShape check_integer_gemm_args(c10::DeviceType type, WeightKind kind, const at::Tensor& x_q,
                                         const at::Tensor& x_sums, const at::Tensor& weight, int64_t group_size,
                                         const char* op) {
  check_device_type(x_q, type, "x_q", op);
  const int64_t k_pad = check_quantized_activation(x_q, op);
  check_beside(x_q, weight, type, "weight", op);
  check_weight(kind, weight, k_pad, op);
  check_group_size(group_size, op);
  const GemmShape s{x_q.size(0), weight.size(0), k_pad, num_groups(k_pad, group_size)};
  if (kind != WeightKind::Int8) {
    check_beside(x_q, x_sums, type, "x_sums", op);
    check_group_sums(x_sums, s.m, s.groups, op);
  }
  return s;
}

// tile_weight: the weight in the tile layout (docs/FORMATS.md), a CPU layout. Its bytes are not
// compared with the weight's (that would cost a pass over both per call): the layer that builds
// it from the weight (QuantLinear) keeps the two in step.
inline void check_tile_weight(c10::DeviceType type, WeightKind kind, const std::optional<at::Tensor>& tile_weight,
                              const at::Tensor& x, int64_t n, int64_t k_pad, const char* op) {
  if (!tile_weight.has_value()) return;
  TORCH_CHECK(type == c10::DeviceType::CPU, op,
              ": tile_weight is a CPU layout (docs/FORMATS.md, tile layout); pass None for tensors on ", x.device());
  check_beside(x, *tile_weight, type, "tile_weight", op);
  const auto want = kind == WeightKind::Int8 ? at::kChar : at::kByte;
  TORCH_CHECK(tile_weight->scalar_type() == want, op, ": tile_weight must be ", want == at::kChar ? "int8" : "uint8",
              " for format ", traits(kind).name, ", got ", tile_weight->scalar_type());
  const int64_t tile_bytes = kTileCodes / codes_per_byte(kind);
  TORCH_CHECK(tile_weight->dim() == 3 && tile_weight->size(0) == tile_panels(n) && tile_weight->size(1) == k_pad / kTileK &&
                  tile_weight->size(2) == tile_bytes,
              op, ": tile_weight must have shape [", tile_panels(n), ", ", k_pad / kTileK, ", ", tile_bytes,
              "] (the tile layout of the weight: pyclipq.formats.tile_layout), got ", tile_weight->sizes());
  TORCH_CHECK(tile_weight->is_contiguous(), op, ": tile_weight must be contiguous");
}

// What a fused linear reads besides the GEMM's operands: weight scales, bias, tile-layout weight.
inline void check_linear_epilogue_args(c10::DeviceType type, WeightKind kind, const at::Tensor& ref,
                                       const at::Tensor& weight_scale, const std::optional<at::Tensor>& bias,
                                       const std::optional<at::Tensor>& tile_weight, const GemmShape& s,
                                       const char* op) {
  check_beside(ref, weight_scale, type, "weight_scale", op);
  check_weight_scale(weight_scale, s.n, s.groups, op);
  check_bias(bias, s.n, op);
  if (bias.has_value()) check_beside(ref, *bias, type, "bias", op);
  check_tile_weight(type, kind, tile_weight, ref, s.n, s.k_pad, op);
}

// The fused linear's weight-side arguments (the activation side is check_quantize_args).
// Returns the shape with m = 0: M is known once x is flattened.
inline GemmShape check_fused_linear_args(c10::DeviceType type, WeightKind kind, const at::Tensor& x,
                                         const at::Tensor& weight, const at::Tensor& weight_scale, int64_t group_size,
                                         const std::optional<at::Tensor>& bias,
                                         const std::optional<at::Tensor>& tile_weight, const char* op) {
  check_float_input(x, op);
  check_device_type(x, type, "x", op);
  check_group_size(group_size, op);
  const int64_t k_pad = padded_k(x.size(-1));
  check_beside(x, weight, type, "weight", op);
  check_weight(kind, weight, k_pad, op);
  const GemmShape s{0, weight.size(0), k_pad, num_groups(k_pad, group_size)};
  check_linear_epilogue_args(type, kind, x, weight_scale, bias, tile_weight, s, op);
  return s;
}

// ---------------------------------------------------------------- packing contracts

// Unpacked codes: uint8 [N, K] with every code <= max_code (reads the tensor: load time only).
inline void check_codes(const at::Tensor& codes, int64_t max_code, c10::DeviceType type, const char* op) {
  check_device_type(codes, type, "codes", op);
  TORCH_CHECK(codes.scalar_type() == at::kByte, op, ": codes must be uint8, got ", codes.scalar_type());
  TORCH_CHECK(codes.dim() == 2, op, ": codes must be 2-D [N, K], got shape ", codes.sizes());
  if (codes.numel() > 0) {
    const int64_t found = codes.max().item<int64_t>();
    TORCH_CHECK(found <= max_code, op, ": codes must be <= ", max_code, " for this format, found ", found);
  }
}

inline void check_packed_bytes(const at::Tensor& packed, c10::DeviceType type, const char* op) {
  check_device_type(packed, type, "packed", op);
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 2, op,
              ": packed must be a 2-D uint8 tensor, got ", packed.scalar_type(), " of shape ", packed.sizes());
}

inline int64_t codes_per_byte_for_bits(int64_t bits, const char* op) {
  TORCH_CHECK(bits == 2 || bits == 4, op, ": bits must be 2 or 4, got ", bits);
  return 8 / bits;
}

// pack_codes: K_pad of the codes; unpack_codes: K_pad held by the packed rows.
inline void check_k_blocks(int64_t k_pad, const char* what, const char* op) {
  TORCH_CHECK(k_pad % kKBlock == 0, op, ": ", what, " must hold a multiple of ", kKBlock, " codes per row, got ",
              k_pad);
}

inline void check_pack_trits_args(const at::Tensor& codes, int64_t k, c10::DeviceType type, const char* op) {
  check_codes(codes, traits(WeightKind::Ternary).max_code, type, op);
  TORCH_CHECK(k >= 1 && k <= codes.size(1), op, ": k must be in [1, codes.size(1) = ", codes.size(1), "], got ", k);
}

// Base-3 storage: ceil(k / 5) bytes per row, each < 3^5 = 243 (reads the tensor: load time only).
inline void check_unpack_trits_args(const at::Tensor& packed, int64_t k, c10::DeviceType type, const char* op) {
  check_packed_bytes(packed, type, op);
  TORCH_CHECK(k >= 1, op, ": k must be >= 1, got ", k);
  const int64_t n_bytes = (k + kTritsPerByte - 1) / kTritsPerByte;
  TORCH_CHECK(packed.size(1) == n_bytes, op, ": packed must have ceil(k / 5) = ", n_bytes, " bytes per row for k = ",
              k, ", got ", packed.size(1));
  if (packed.numel() > 0) {
    const int64_t found = packed.max().item<int64_t>();
    TORCH_CHECK(found <= kMaxTritByte, op, ": packed holds byte ", found, " > ", kMaxTritByte,
                ", not a base-3 ternary layout");
  }
}

}  // namespace pyclipq
