// The per-format entry points of the pyclipq ops (schemas: pyclipq/ops/library.py), shared
// by every backend. A backend supplies its two generic implementations,
//   IntegerGemm(kind, x_q, x_sums, weight, group_size, grouped_output, op_name)
//   FusedLinear(kind, x, weight, weight_scale, group_size, bias, act_scale, tile_weight, op_name)
// and register_format_ops binds the eight schema signatures to them.
#pragma once
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>

#include "pyclipq/formats.h"

namespace pyclipq {

template <auto IntegerGemm, auto FusedLinear>
struct FormatEntryPoints {
  using OptTensor = std::optional<at::Tensor>;

  static at::Tensor int8_gemm(const at::Tensor& x_q, const at::Tensor& weight) {
    return IntegerGemm(WeightKind::Int8, x_q, at::Tensor(), weight, 0, false, "pyclipq.int8_gemm");
  }
  static at::Tensor int4_gemm(const at::Tensor& x_q, const at::Tensor& x_sums, const at::Tensor& weight,
                              int64_t group_size) {
    return IntegerGemm(WeightKind::Int4, x_q, x_sums, weight, group_size, true, "pyclipq.int4_gemm");
  }
  static at::Tensor int2_gemm(const at::Tensor& x_q, const at::Tensor& x_sums, const at::Tensor& weight,
                              int64_t group_size) {
    return IntegerGemm(WeightKind::Int2, x_q, x_sums, weight, group_size, true, "pyclipq.int2_gemm");
  }
  static at::Tensor ternary_gemm(const at::Tensor& x_q, const at::Tensor& x_sums, const at::Tensor& weight) {
    return IntegerGemm(WeightKind::Ternary, x_q, x_sums, weight, 0, false, "pyclipq.ternary_gemm");
  }

  static at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& ws,
                                const OptTensor& bias, const OptTensor& act_scale, const OptTensor& tile_weight) {
    return FusedLinear(WeightKind::Int8, x, w, ws, 0, bias, act_scale, tile_weight, "pyclipq.int8_linear");
  }
  static at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& ws, int64_t group_size,
                                const OptTensor& bias, const OptTensor& act_scale, const OptTensor& tile_weight) {
    return FusedLinear(WeightKind::Int4, x, w, ws, group_size, bias, act_scale, tile_weight, "pyclipq.int4_linear");
  }
  static at::Tensor int2_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& ws, int64_t group_size,
                                const OptTensor& bias, const OptTensor& act_scale, const OptTensor& tile_weight) {
    return FusedLinear(WeightKind::Int2, x, w, ws, group_size, bias, act_scale, tile_weight, "pyclipq.int2_linear");
  }
  static at::Tensor ternary_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& ws,
                                   const OptTensor& bias, const OptTensor& act_scale, const OptTensor& tile_weight) {
    return FusedLinear(WeightKind::Ternary, x, w, ws, 0, bias, act_scale, tile_weight, "pyclipq.ternary_linear");
  }
};

template <class EntryPoints>
void register_format_ops(torch::Library& m) {
  m.impl("int8_gemm", &EntryPoints::int8_gemm);
  m.impl("int4_gemm", &EntryPoints::int4_gemm);
  m.impl("int2_gemm", &EntryPoints::int2_gemm);
  m.impl("ternary_gemm", &EntryPoints::ternary_gemm);
  m.impl("int8_linear", &EntryPoints::int8_linear);
  m.impl("int4_linear", &EntryPoints::int4_linear);
  m.impl("int2_linear", &EntryPoints::int2_linear);
  m.impl("ternary_linear", &EntryPoints::ternary_linear);
}

}  // namespace pyclipq
