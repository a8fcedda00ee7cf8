"""QuantLinear: a Linear layer whose weight is in a pyclipq format."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import formats, ops, primitives
from ..configs import LayerConfig
from .packed import PackedWeight, dequantize_packed


def static_act_scale(layer: LayerConfig, scale) -> torch.Tensor:
    """`scale` as the 0-d float32 activation scale of a static layer, or a ValueError saying why not."""
    if layer.activation != "static":
        raise ValueError(f"set_act_scale needs activation='static', this layer has {layer.activation!r}")
    scale = torch.as_tensor(scale, dtype=torch.float32)
    if scale.numel() != 1 or not bool(torch.isfinite(scale).all()) or float(scale) <= 0:
        raise ValueError(f"scale must be one finite positive number, got {scale.tolist()}")
    return scale.reshape(())


def _version_of(t: torch.Tensor) -> int:
    """t's in-place write counter; inference tensors keep none (and take no writes outside inference mode)."""
    return -2 if t.is_inference() else t._version


def rotate_input_dim(t: torch.Tensor, block: int) -> torch.Tensor:
    """t [..., in] with its last (input) dimension rotated by blocks of `block` (1: unchanged): a
    rotated layer's input as it runs it, and its weight [out, in] as it stores it. The fast
    Walsh-Hadamard op, differentiable and its own inverse (the dense product of
    primitives.rotate_blocks in real arithmetic). The one definition that convert, calibration, the
    packed forward, QAT's fake-quant and its export share, so that they quantize the very same floats."""
    return ops.hadamard_rotate(t.contiguous(), block) if block > 1 else t


class QuantLinear(PackedWeight):
    """y = x W^T + b with W packed in `layer.format`.

    - activation "dynamic": one fused op per call (``pyclipq.ops.<format>_linear``):
      per-token int8 activations, integer GEMM, float epilogue.
    - activation "static": the same op with the calibrated per-tensor ``act_scale``
      buffer; calling the layer before calibration fills it is an error.
    - activation "none" (weight-only): the weight is dequantized and F.linear runs.
    - format "float" (pass-through): the float weight, F.linear; the module swap
      is exact.

    Tile layout: when this process's CPU kernel table reads it for the layer's format (AMX: every
    format; AVX-512 VNNI: int8; ``ops.cpu_reads_tile_layout``),
    a CPU layer keeps its weight a second time in the tile layout (``tile_weight``, a non-persistent
    buffer: checkpoints hold the compute layout) and passes it to the fused op, which then skips its
    per-call repack. It is built when the weight is set, loaded or moved to the CPU, and rebuilt
    (eager mode) when ``packed_weight`` was written in place since.

    Input transforms (``layer.smoothing``, ``layer.rotation``): the layer computes
    ``transform_input(x) @ W'^T`` with ``W' = transform_weight(W)`` stored, which equals
    ``x W^T`` in real arithmetic. Smoothing divides x by the ``smooth_scale`` buffer
    (unless an upstream LayerNorm was folded to do it) and multiplies W's columns by it;
    rotation multiplies both by the same orthonormal block-Hadamard matrix.
    ``load_float_weight`` takes the *original* weight and transforms it.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, layer: LayerConfig, dtype=None, device=None):
        super().__init__(out_features, in_features, layer, dtype=dtype, device=device)
        if bias:
            self.register_buffer("bias", torch.empty(out_features, dtype=self.float_dtype, device=device))
        else:
            self.register_buffer("bias", None)
        if layer.activation == "static":
            # 0 is never a valid scale: it marks "not calibrated yet".
            self.register_buffer("act_scale", torch.zeros((), dtype=torch.float32, device=device))
        else:
            self.register_buffer("act_scale", None)
        self._act_scale_ready = False
        if layer.smoothing != "none":
            self.register_buffer("smooth_scale", torch.ones(in_features, dtype=torch.float32, device=device))
        else:
            self.register_buffer("smooth_scale", None)
        self.rotation_block = primitives.rotation_block(in_features, layer.rotation) if layer.rotation else 1
        self.register_buffer("tile_weight", None, persistent=False)
        self._tile_source_version = -1  # packed_weight._version that tile_weight was built from

    @torch.no_grad()
    def refresh_tile_weight(self) -> None:
        """(Re)build ``tile_weight`` from ``packed_weight`` where the fused op reads it, else drop it."""
        self._tile_source_version = _version_of(self.packed_weight)
        if not self._reads_tile_layout():
            self.tile_weight = None
            return
        with torch.inference_mode(False):  # a normal tensor even when first built under inference_mode
            self.tile_weight = formats.tile_layout(self.packed_weight, self.layer.spec)

    def _reads_tile_layout(self) -> bool:
        return (self.layer.activation != "none" and self.packed_weight.device.type == "cpu"
                and ops.cpu_reads_tile_layout(self.layer.format))

    def _tile_weight_for(self, rows: slice | None):
        """tile_weight for output rows `rows` (None: all; else whole panels of 16, or None: the op
        then repacks the rows itself)."""
        if not ops.cpu_reads_tile_layout(self.layer.format):
            return None
        if not torch.compiler.is_compiling() and self._tile_source_version != _version_of(self.packed_weight):
            self.refresh_tile_weight()  # packed_weight was written in place since the tile layout was built
        if self.tile_weight is None or rows is None:
            return self.tile_weight
        start, stop, _ = rows.indices(self.out_features)
        if start % formats.TILE_COLUMNS or (stop % formats.TILE_COLUMNS and stop != self.out_features):
            return None
        return self.tile_weight[start // formats.TILE_COLUMNS: -(-stop // formats.TILE_COLUMNS)]

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        """What the stored weight multiplies: x smoothed (online) and rotated, as the layer runs it."""
        if self.layer.smoothing == "online":
            x = x / self.smooth_scale.to(x.dtype)
        return rotate_input_dim(x, self.rotation_block)

    def transform_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The stored (to be quantized) weight for an original float weight [out, in]."""
        if self.layer.smoothing != "none":
            weight = weight * self.smooth_scale.to(device=weight.device, dtype=weight.dtype)
        return rotate_input_dim(weight, self.rotation_block)

    @torch.no_grad()
    def load_float_weight(self, weight: torch.Tensor) -> None:
        """Quantize an original float [out_features, in_features] weight (input transforms applied here)."""
        if self.layer.has_input_transform and tuple(weight.shape) == (self.out_features, self.in_features):
            weight = self.transform_weight(weight.to(torch.float32))
        super().load_float_weight(weight)
        if not self.layer.is_float:
            self.refresh_tile_weight()

    @classmethod
    def from_float(cls, linear: nn.Linear, layer: LayerConfig) -> "QuantLinear":
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
        return cls.from_weight(linear.weight, linear.bias, layer)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, layer: LayerConfig) -> "QuantLinear":
        """From a float weight [out, in] and optional bias [out]."""
        out_features, in_features = weight.shape
        module = cls(in_features, out_features, bias is not None, layer=layer, dtype=weight.dtype, device=weight.device)
        module.load_float_weight(weight)
        if bias is not None:
            with torch.no_grad():
                module.bias.copy_(bias)
        return module

    # open_clip's get_cast_dtype() reads `mlp.c_fc.int8_original_dtype` when a
    # quantized c_fc has no float `weight` (the bitsandbytes convention).
    @property
    def int8_original_dtype(self) -> torch.dtype:
        return self.float_dtype

    @torch.no_grad()
    def set_act_scale(self, scale) -> None:
        """Set the calibrated per-tensor activation scale of a static layer."""
        scale = static_act_scale(self.layer, scale)  # before touching act_scale: None on a dynamic layer
        self.act_scale.copy_(scale)
        self._act_scale_ready = True

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if not self.layer.is_float:
            self.refresh_tile_weight()
        if self.act_scale is not None and prefix + "act_scale" in state_dict:
            self._act_scale_ready = bool(self.act_scale > 0)

    def _static_act_scale(self) -> torch.Tensor:
        if not self._act_scale_ready:
            # Checked once (a host sync); later calls read the flag, which torch.compile can guard on.
            if not bool(self.act_scale > 0):
                raise RuntimeError(
                    f"QuantLinear {self.layer_name or '(unnamed)'} uses activation='static' but its act_scale "
                    "is not calibrated yet: calibrate the model first (or call set_act_scale), "
                    "or convert with activation='dynamic'"
                )
            self._act_scale_ready = True
        return self.act_scale

    def call_act_scale(self) -> torch.Tensor | None:
        """The activation scale a call passes to the op: the calibrated one (static), else None."""
        return self._static_act_scale() if self.layer.activation == "static" else None

    def _linear(self, x: torch.Tensor, rows: slice | None) -> torch.Tensor:
        """y for output rows `rows` (None: all of them, without slicing views: ~1 us each at M = 1)."""
        # The fused ops see only K rounded up to the K block: 700 features would pass for 768.
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"QuantLinear {self.layer_name or '(unnamed)'}: x must have in_features = {self.in_features} "
                f"features in its last dimension, got shape {list(x.shape)}"
            )
        layer = self.layer

        def part(t):
            return t if rows is None or t is None else t[rows]

        bias = part(self.bias)
        if layer.has_input_transform:
            x = self.transform_input(x)
        if layer.is_float:
            return F.linear(x, part(self.weight), bias)
        packed, scale = part(self.packed_weight), part(self.weight_scale)
        if layer.activation == "none":
            weight = dequantize_packed(packed, scale, layer.format, self.in_features, x.dtype)
            return F.linear(x, weight, bias.to(x.dtype) if bias is not None else None)
        act_scale = self.call_act_scale()
        tile_weight = self._tile_weight_for(rows) if x.device.type == "cpu" else None
        return ops.fused_linear(layer.spec, x, packed, scale, layer.group_size, bias, act_scale, tile_weight)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if not self.layer.is_float:
            self.refresh_tile_weight()  # the layout is the CPU's: rebuilt there, dropped elsewhere
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._linear(x, None)

    def forward_rows(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Only output features [start, stop): one of q, k, v of a packed attention in_proj."""
        return self._linear(x, slice(start, stop))

    def extra_repr(self) -> str:
        text = f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
        text += self._layer_repr()
        if not self.layer.is_float:
            text += f", activation={self.layer.activation}"
        return text
