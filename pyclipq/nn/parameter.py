"""PackedParameter: a bare weight Parameter stored packed, read back as a float tensor.

CLIP keeps some weights as tensors that its code uses directly: the projections
``visual.proj`` / ``text_projection`` of open_clip and OpenAI CLIP (``x @ proj``)
and the patch-embedding convolution, whose ``.weight.dtype`` Hugging Face and
OpenAI CLIP read to pick their compute dtype. A module swap cannot reach
``x @ proj``, so these are quantized weight-only through
``torch.nn.utils.parametrize``: the attribute keeps working as a tensor (the
dequantized weight) while the state holds only the packed buffers. With autograd
off it is dequantized once and reused until the buffers change (one float copy of
these few small tensors, outside the state dict); with autograd on, and under
torch.compile, which traces parametrizations, it is recomputed on every access.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..configs import LayerConfig
from .packed import PackedWeight

# How the parameter's shape maps to the [out_features, in_features] rows a format quantizes.
LAYOUTS = ("in_out", "out_rows")


def rows_shape(shape: tuple[int, ...], layout: str) -> tuple[int, int]:
    if layout == "in_out":  # x @ P with P [in, out]: a column is one output channel
        if len(shape) != 2:
            raise ValueError(f"an 'in_out' parameter must be 2-D [in, out], got shape {list(shape)}")
        return shape[1], shape[0]
    if layout == "out_rows":  # [out, ...] (Linear, Conv): each output channel's weights flattened
        out = shape[0]
        return out, int(torch.Size(shape[1:]).numel())
    raise ValueError(f"layout must be one of {list(LAYOUTS)}, got {layout!r}")


def to_rows(weight: torch.Tensor, layout: str) -> torch.Tensor:
    return weight.t() if layout == "in_out" else weight.reshape(weight.shape[0], -1)


class PackedParameter(PackedWeight):
    """A parametrization (see torch.nn.utils.parametrize) returning the dequantized parameter."""

    def __init__(self, shape, layout: str, layer: LayerConfig, *, dtype=None, device=None):
        self.shape = tuple(int(s) for s in shape)
        out_features, in_features = rows_shape(self.shape, layout)
        # a patch embedding ("out_rows") may keep dynamic activations: PatchConv2d then runs the
        # fused linear on its patches; every other use reads the dequantized tensor
        keep = layout == "out_rows" and layer.activation == "dynamic"
        weight_only = layer.weight_only()
        super().__init__(out_features, in_features, dataclasses.replace(weight_only, activation="dynamic") if keep
                         else weight_only, dtype=dtype, device=device)
        self.layout = layout
        self._cache, self._cache_key = None, None  # see forward

    @classmethod
    def from_float(cls, weight: torch.Tensor, layout: str, layer: LayerConfig) -> "PackedParameter":
        module = cls(weight.shape, layout, layer, dtype=weight.dtype, device=weight.device)
        module.load_float_weight(to_rows(weight.detach(), layout))
        return module

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        # `original` is an empty placeholder whose dtype follows the model's .to(dtype).
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return self._dequantized(original.dtype)
        # Inference reads the same weight on every call (x @ proj): dequantize it once per
        # state of the buffers. The key changes when they are written in place (_version),
        # replaced (.to(), load_state_dict with assign) or read in another dtype or mode.
        buffers = tuple(self._buffers.values())
        key = (original.dtype, torch.is_inference_mode_enabled(),
               *((b.data_ptr(), b._version, b.device) for b in buffers))
        if self._cache_key != key:
            self._cache, self._cache_key = self._dequantized(original.dtype), key
        return self._cache

    def _dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        rows = self.dequantize_weight(dtype)
        return rows.t() if self.layout == "in_out" else rows.reshape(self.shape)

    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        # The float values live in the packed buffers; the parametrization's `original`
        # only keeps dtype and device, so the float copy is not held twice.
        return weight.new_empty(0)

    def extra_repr(self) -> str:
        return f"shape={list(self.shape)}, layout={self.layout}, {self._layer_repr()}"


def quantize_parameter_(module: nn.Module, name: str, packed: PackedParameter) -> None:
    """Replace `module.<name>` by `packed` (a PackedParameter for that tensor)."""
    current = getattr(module, name)
    if not isinstance(current, torch.Tensor) or tuple(current.shape) != packed.shape:
        raise ValueError(
            f"{type(module).__name__}.{name} must be a tensor of shape {list(packed.shape)}, "
            f"got {getattr(current, 'shape', type(current).__name__)}"
        )
    # unsafe: right_inverse deliberately changes the shape of `original`.
    parametrize.register_parametrization(module, name, packed, unsafe=True)


def packed_parameters(model: nn.Module):
    """(owner name, parameter name, PackedParameter) for every packed parameter in `model`."""
    for owner_name, owner in model.named_modules():
        if not parametrize.is_parametrized(owner):
            continue
        for name, plist in owner.parametrizations.items():
            for p in plist:
                if isinstance(p, PackedParameter):
                    yield owner_name, name, p
