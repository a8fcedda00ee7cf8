"""A weight held in a pyclipq format: packed codes + float32 scales as buffers.

`PackedWeight` is the base of every pyclipq module that owns a quantized weight
(QuantLinear, QuantEmbedding, PackedParameter). It knows the buffer shapes of
each format (docs/FORMATS.md), how to fill them from a float weight, and how to
dequantize them. With the "float" format it keeps the float weight instead
(pass-through).
"""
from __future__ import annotations

import torch
from torch import nn

from .. import formats, ops, primitives
from ..configs import LayerConfig

# Buffers whose dtype the format fixes at float32: a model-wide .half() or
# .to(torch.bfloat16) must move them to the new device but never round them.
FP32_BUFFERS = ("weight_scale", "act_scale")


def packed_shape(fmt: "str | formats.WeightFormat", out_features: int, in_features: int) -> tuple[int, int]:
    k_pad = formats.padded_k(in_features)
    return out_features, k_pad // formats.as_format(fmt).codes_per_byte


def pack_codes(codes: torch.Tensor, fmt: "str | formats.WeightFormat") -> torch.Tensor:
    """Unpacked codes [N, K_pad] (primitives.quantize_weight) -> the compute layout kernels read."""
    spec = formats.as_format(fmt)
    return ops.pack_codes(codes, spec.bits) if spec.bit_packed else codes


def unpack_codes(packed: torch.Tensor, fmt: "str | formats.WeightFormat") -> torch.Tensor:
    spec = formats.as_format(fmt)
    return ops.unpack_codes(packed, spec.bits) if spec.bit_packed else packed


def dequantize_packed(packed: torch.Tensor, scale: torch.Tensor, fmt: str, in_features: int, dtype) -> torch.Tensor:
    """Packed rows + their scales -> float weight rows [n, in_features] in `dtype`."""
    codes = unpack_codes(packed, fmt)
    return primitives.dequantize_codes(codes, scale, fmt, in_features).to(dtype)


class PackedWeight(nn.Module):
    """Owns an [out_features, in_features] weight in the format `layer.format`.

    Buffers: ``packed_weight`` (int8 [N, K_pad] for int8, uint8 block-planar
    codes otherwise) and ``weight_scale`` (float32 [N] or [N, G]); with the
    "float" format a float ``weight`` [N, K] instead.
    """

    def __init__(self, out_features: int, in_features: int, layer: LayerConfig, *, dtype=None, device=None):
        super().__init__()
        if not isinstance(layer, LayerConfig):
            raise ValueError(f"layer must be a pyclipq.configs.LayerConfig, got {type(layer).__name__}")
        if in_features < 1 or out_features < 1:
            raise ValueError(f"in_features and out_features must be >= 1, got {in_features} and {out_features}")
        self.in_features = in_features
        self.out_features = out_features
        self.layer = layer
        self.layer_name = ""  # set by pyclipq.convert (its name in the model)
        self.kind = "linear"  # report kind, set by pyclipq.convert (see pyclipq.models.base.KINDS)
        # The float dtype the weight stands for; follows .half()/.to(dtype) (see _apply).
        self.float_dtype = dtype or torch.get_default_dtype()
        if layer.is_float:
            self.register_buffer("weight", torch.empty(out_features, in_features, dtype=self.float_dtype, device=device))
            return
        code_dtype = layer.spec.code_dtype
        self.register_buffer(
            "packed_weight", torch.empty(packed_shape(layer.format, out_features, in_features), dtype=code_dtype, device=device)
        )
        self.register_buffer(
            "weight_scale",
            torch.empty(
                layer.spec.scale_shape(out_features, in_features, layer.group_size),
                dtype=torch.float32, device=device,
            ),
        )

    @property
    def format(self) -> str:
        return self.layer.format

    @torch.no_grad()
    def load_float_weight(self, weight: torch.Tensor) -> None:
        """Quantize a float [out_features, in_features] weight into this module's buffers."""
        expected = (self.out_features, self.in_features)
        if tuple(weight.shape) != expected:
            raise ValueError(f"weight must have shape {list(expected)}, got {list(weight.shape)}")
        if self.layer.is_float:
            self.weight.copy_(weight)
            return
        device = self.packed_weight.device
        # On the CPU whatever the module's device: a converted model's codes do not depend on where
        # it was converted (a GPU's reductions for ternary's mean|w| may round differently).
        codes, scale = primitives.quantize_weight(
            weight.detach().cpu(), self.layer.format, self.layer.group_size, self.layer.threshold_rule
        )
        self.packed_weight.copy_(pack_codes(codes.to(device), self.layer.format))
        self.weight_scale.copy_(scale)

    def dequantize_weight(self, dtype=None) -> torch.Tensor:
        """The float weight [out_features, in_features] this module computes with."""
        dtype = dtype or self.float_dtype
        if self.layer.is_float:
            return self.weight.to(dtype)
        return dequantize_packed(self.packed_weight, self.weight_scale, self.layer.format, self.in_features, dtype)

    def weight_nbytes(self) -> int:
        """Bytes of the weight buffers in memory (compute layout)."""
        names = ("weight",) if self.layer.is_float else ("packed_weight", "weight_scale")
        return sum(self._buffers[n].numel() * self._buffers[n].element_size() for n in names)

    def _apply(self, fn, recurse=True):
        protected = {n: self._buffers[n] for n in FP32_BUFFERS if self._buffers.get(n) is not None}
        for name in protected:
            self._buffers[name] = None
        try:
            super()._apply(fn, recurse)
        finally:
            reference = next(iter(protected.values()), None)
            # What fn does to a float tensor of our dtype says where (and in what dtype) the model goes.
            probe = fn(torch.zeros((), dtype=self.float_dtype, device=reference.device if reference is not None else None))
            for name, tensor in protected.items():
                self._buffers[name] = tensor.to(device=probe.device)
            if isinstance(probe, torch.Tensor) and probe.is_floating_point():
                self.float_dtype = probe.dtype
        return self

    def _layer_repr(self) -> str:
        text = f"format={self.layer.format}"
        if self.layer.spec is not None and self.layer.spec.grouped:
            text += f", group_size={self.layer.group_size}"
        if self.layer.spec is not None and self.layer.spec.threshold_rule:
            text += f", threshold_rule={self.layer.threshold_rule}"
        return text
