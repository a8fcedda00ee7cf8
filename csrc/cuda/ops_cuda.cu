// CUDA implementations of the pyclipq ops (schemas: pyclipq/ops/library.py).
// This file checks (csrc/op_checks.h), allocates and launches; the kernels live in the
// torch-free .cu files behind kernels.cuh. Every launch runs on the current stream of
// the input's device, under a device guard, and is checked right after.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "kernels.cuh"
#include "op_checks.h"
#include "op_entry_points.h"

namespace pyclipq::cuda_ops {
namespace {

using cuda::DType;

constexpr c10::DeviceType kCUDA = c10::DeviceType::CUDA;

DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::F32;
    case at::kBFloat16: return DType::BF16;
    case at::kHalf: return DType::F16;
    case at::kInt: return DType::I32;
    default: TORCH_INTERNAL_ASSERT(false, "no kernel dtype for ", t.scalar_type());
  }
}

struct Quantized {
  at::Tensor q, scale, sums;
};

// Non-finite activations are not rejected here: that check needs a device sync. A row
// holding NaN/Inf gets scale NaN, so its outputs are NaN (documented in pyclipq.ops).
Quantized quantize(const at::Tensor& x, int64_t group_size, const std::optional<at::Tensor>& act_scale,
                   const char* op) {
  check_quantize_args(kCUDA, x, group_size, act_scale, op);
  const int64_t k = x.size(-1), k_pad = padded_k(k), m = x.numel() / k;
  at::Tensor rows = x.reshape({m, k});
  if (rows.stride(1) != 1) rows = rows.contiguous();
  Quantized out{at::empty({m, k_pad}, x.options().dtype(at::kChar)), at::empty({m}, x.options().dtype(at::kFloat)),
                at::empty({m, num_groups(k_pad, group_size)}, x.options().dtype(at::kInt))};
  const c10::cuda::CUDAGuard guard(x.device());
  cuda::QuantizeArgs a{rows.data_ptr(),
                       dtype_of(rows),
                       m,
                       k,
                       k_pad,
                       m > 1 ? rows.stride(0) : k,
                       static_cast<int>(group_size),
                       act_scale.has_value() ? act_scale->data_ptr<float>() : nullptr,
                       out.q.data_ptr<int8_t>(),
                       out.scale.data_ptr<float>(),
                       out.sums.data_ptr<int32_t>()};
  cuda::launch_quantize(a, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_per_token(const at::Tensor& x, int64_t group_size,
                                                                  const std::optional<at::Tensor>& act_scale) {
  auto r = quantize(x, group_size, act_scale, "pyclipq.quantize_per_token");
  return {r.q, r.scale, r.sums};
}

cuda::GemmArgs gemm_args(WeightKind kind, const at::Tensor& x_q, const at::Tensor& sums, const at::Tensor& weight,
                         int64_t group_size) {
  const auto& tr = traits(kind);
  const int64_t k_pad = x_q.size(1);
  cuda::GemmArgs a{};
  a.a = x_q.data_ptr<int8_t>();
  a.w = static_cast<const uint8_t*>(weight.data_ptr());
  a.sums = sums.defined() ? sums.data_ptr<int32_t>() : nullptr;
  a.m = static_cast<int>(x_q.size(0));
  a.n = static_cast<int>(weight.size(0));
  a.k_pad = static_cast<int>(k_pad);
  a.groups = static_cast<int>(num_groups(k_pad, group_size));
  a.group_steps = static_cast<int>((group_size == 0 ? k_pad : group_size) / 32);
  a.bits = tr.bits;
  a.level_mul = tr.level_mul;
  a.level_offset = tr.level_offset;
  return a;
}

at::Tensor integer_gemm(WeightKind kind, const at::Tensor& x_q, const at::Tensor& x_sums, const at::Tensor& weight,
                        int64_t group_size, bool grouped_output, const char* op) {
  const auto [m, n, k_pad, groups] = check_integer_gemm_args(kCUDA, kind, x_q, x_sums, weight, group_size, op);
  TORCH_CHECK(m < INT32_MAX && n < INT32_MAX && k_pad < INT32_MAX, op, ": sizes must fit in int32");
  at::Tensor out = at::empty({m, n, groups}, x_q.options().dtype(at::kInt));
  const c10::cuda::CUDAGuard guard(x_q.device());
  cuda::GemmArgs a = gemm_args(kind, x_q, kind == WeightKind::Int8 ? at::Tensor() : x_sums, weight, group_size);
  a.out = out.data_ptr();
  a.out_dtype = DType::I32;
  cuda::launch_gemm(a, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return grouped_output ? out : out.view({m, n});
}

// Quantize (one kernel), then the GEMV kernel for M <= 16 or the tiled GEMM: two launches.
at::Tensor fused_linear(WeightKind kind, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& weight_scale,
                        int64_t group_size, const std::optional<at::Tensor>& bias,
                        const std::optional<at::Tensor>& act_scale, const std::optional<at::Tensor>& tile_weight,
                        const char* op) {
  const int64_t n = check_fused_linear_args(kCUDA, kind, x, weight, weight_scale, group_size, bias, tile_weight, op).n;
  at::Tensor bias_t;
  if (bias.has_value()) {
    bias_t = bias->scalar_type() == at::kFloat || bias->scalar_type() == at::kBFloat16 ||
                     bias->scalar_type() == at::kHalf
                 ? bias->contiguous()
                 : bias->to(at::kFloat).contiguous();
  }
  const c10::cuda::CUDAGuard guard(x.device());
  Quantized qa = quantize(x, group_size, act_scale, op);
  const int64_t m = qa.q.size(0);
  TORCH_CHECK(m < INT32_MAX && n < INT32_MAX, op, ": sizes must fit in int32");
  at::Tensor y = at::empty({m, n}, x.options());
  cuda::GemmArgs a = gemm_args(kind, qa.q, qa.sums, weight, group_size);
  a.s = qa.scale.data_ptr<float>();
  a.w_scale = weight_scale.data_ptr<float>();
  a.bias = bias_t.defined() ? bias_t.data_ptr() : nullptr;
  a.bias_dtype = bias_t.defined() ? dtype_of(bias_t) : DType::None;
  a.out = y.data_ptr();
  a.out_dtype = dtype_of(y);
  if (m <= cuda::kGemvMaxM) cuda::launch_gemv(a, c10::cuda::getCurrentCUDAStream());
  else cuda::launch_gemm(a, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = n;
  return y.view(out_shape);
}

// ---------------------------------------------------------------- packing (load time: a host sync is fine)

at::Tensor pack_codes(const at::Tensor& codes_in, int64_t bits) {
  const char* op = "pyclipq.pack_codes";
  const int64_t per = codes_per_byte_for_bits(bits, op);
  check_codes(codes_in, (1 << bits) - 1, kCUDA, op);
  const at::Tensor codes = codes_in.contiguous();
  const int64_t n = codes.size(0), k_pad = codes.size(1);
  check_k_blocks(k_pad, "codes", op);
  at::Tensor out = at::empty({n, k_pad / per}, codes.options());
  const c10::cuda::CUDAGuard guard(codes.device());
  cuda::launch_pack_codes(codes.data_ptr<uint8_t>(), out.data_ptr<uint8_t>(), n, k_pad, static_cast<int>(bits),
                          c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor unpack_codes(const at::Tensor& packed_in, int64_t bits) {
  const char* op = "pyclipq.unpack_codes";
  const int64_t per = codes_per_byte_for_bits(bits, op);
  check_packed_bytes(packed_in, kCUDA, op);
  const at::Tensor packed = packed_in.contiguous();
  const int64_t n = packed.size(0), k_pad = packed.size(1) * per;
  check_k_blocks(k_pad, "packed", op);
  at::Tensor out = at::empty({n, k_pad}, packed.options());
  const c10::cuda::CUDAGuard guard(packed.device());
  cuda::launch_unpack_codes(packed.data_ptr<uint8_t>(), out.data_ptr<uint8_t>(), n, k_pad, static_cast<int>(bits),
                            c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor pack_trits(const at::Tensor& codes_in, int64_t k) {
  const char* op = "pyclipq.pack_trits";
  check_pack_trits_args(codes_in, k, kCUDA, op);
  const at::Tensor codes = codes_in.contiguous();
  const int64_t n = codes.size(0);
  at::Tensor out = at::empty({n, (k + kTritsPerByte - 1) / kTritsPerByte}, codes.options());
  const c10::cuda::CUDAGuard guard(codes.device());
  cuda::launch_pack_trits(codes.data_ptr<uint8_t>(), out.data_ptr<uint8_t>(), n, codes.size(1), k,
                          traits(WeightKind::Ternary).pad_code, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor unpack_trits(const at::Tensor& packed_in, int64_t k) {
  const char* op = "pyclipq.unpack_trits";
  check_unpack_trits_args(packed_in, k, kCUDA, op);
  const at::Tensor packed = packed_in.contiguous();
  const int64_t n = packed.size(0), k_pad = padded_k(k);
  at::Tensor out = at::empty({n, k_pad}, packed.options());
  const c10::cuda::CUDAGuard guard(packed.device());
  cuda::launch_unpack_trits(packed.data_ptr<uint8_t>(), out.data_ptr<uint8_t>(), n, k, k_pad,
                            traits(WeightKind::Ternary).pad_code, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pyclipq, CUDA, m) {
  m.impl("quantize_per_token", &quantize_per_token);
  register_format_ops<FormatEntryPoints<&integer_gemm, &fused_linear>>(m);
  m.impl("pack_codes", &pack_codes);
  m.impl("unpack_codes", &unpack_codes);
  m.impl("pack_trits", &pack_trits);
  m.impl("unpack_trits", &unpack_trits);
}

}  // namespace pyclipq::cuda_ops
