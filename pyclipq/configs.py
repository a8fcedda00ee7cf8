"""Conversion configs: what `pyclipq.convert` quantizes, and how.

A `QuantConfig` describes a whole conversion (which modules, which format); a
`LayerConfig` is what one converted layer records about itself (it is what a
checkpoint stores per layer). Both validate in ``__post_init__`` and name the
valid choices when something is wrong. The strings "int8", "int4", "int2",
"ternary" and the presets in `PRESETS` resolve through `resolve_config`.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import functools
from dataclasses import dataclass
from typing import Any, Mapping

from . import formats

CONFIG_VERSION = 1

# "float" keeps the weights in floating point behind the same module swap
# (pass-through): it is how the swap itself is proven exact.
FLOAT_FORMAT = "float"
WEIGHT_FORMATS = (*formats.FORMATS, FLOAT_FORMAT)
ACTIVATION_MODES = ("dynamic", "static", "none")
# Per-input-channel smoothing (SmoothQuant): "online" divides x by the layer's smooth_scale at
# run time; "folded" means an upstream LayerNorm already did (calibrate folds it there).
SMOOTHING_MODES = ("none", "online", "folded")

# group size used when a config names a grouped format without one
DEFAULT_GROUP_SIZE = {f.name: f.default_group_size for f in formats.FORMATS.values() if f.grouped}


def _check_choice(argument: str, value: Any, choices) -> None:
    if value not in choices:
        raise ValueError(f"{argument} must be one of {list(choices)}, got {value!r}")


def _resolve_group_size(fmt: str, group_size: int | None) -> int:
    grouped = fmt in formats.FORMATS and formats.get_format(fmt).grouped
    if group_size is None:
        return DEFAULT_GROUP_SIZE.get(fmt, 0)
    if not isinstance(group_size, int) or isinstance(group_size, bool):
        raise ValueError(f"group_size must be an int, one of {list(formats.GROUP_SIZES)}, got {group_size!r}")
    if grouped:
        formats.check_group_size(group_size)
    elif group_size != 0:
        raise ValueError(
            f"group_size must be 0 for format {fmt!r} (it has one scale per output channel); "
            f"grouped formats are {[f.name for f in formats.FORMATS.values() if f.grouped]}, got {group_size}"
        )
    return group_size


def _resolve_activation(fmt: str, activation: str | None) -> str:
    if activation is None:
        return "none" if fmt == FLOAT_FORMAT else "dynamic"
    _check_choice("activation", activation, ACTIVATION_MODES)
    if fmt == FLOAT_FORMAT and activation != "none":
        raise ValueError(f"activation must be 'none' for format {FLOAT_FORMAT!r} (pass-through), got {activation!r}")
    return activation


def _check_rotation(rotation) -> None:
    if (not isinstance(rotation, int) or isinstance(rotation, bool) or rotation < 0
            or (rotation and (rotation & (rotation - 1) or rotation < 2))):
        raise ValueError(f"rotation must be 0 (none) or a power of 2 >= 2 (the Hadamard block size), got {rotation!r}")


@dataclass(frozen=True)
class LayerConfig:
    """How one layer's weight is stored and its activations are handled.

    activation: "dynamic" = per-token int8 computed at run time; "static" = one
    calibrated per-tensor scale (the layer's ``act_scale`` buffer, filled by
    calibration); "none" = weight-only (the packed weight is dequantized and a
    float GEMM runs).

    Input transforms of a linear layer (``QuantLinear``), each exact in real arithmetic
    because the stored weight carries the inverse: y = T(x) (W T^-T)^T = x W^T.
    smoothing: "none" | "online" | "folded" (SmoothQuant; see ``SMOOTHING_MODES``), set by
    ``pyclipq.calibrate(smooth=...)``. rotation: 0, or the block size b (a power of 2) of an
    orthonormal block-Hadamard rotation of the input, spreading outlier channels over b
    channels before int8 quantization (QuaRot-style, applied online).
    """

    format: str
    group_size: int | None = None
    activation: str | None = None
    threshold_rule: str = "absmean"
    smoothing: str = "none"
    rotation: int = 0

    def __post_init__(self):
        _check_choice("format", self.format, WEIGHT_FORMATS)
        object.__setattr__(self, "group_size", _resolve_group_size(self.format, self.group_size))
        object.__setattr__(self, "activation", _resolve_activation(self.format, self.activation))
        _check_choice("threshold_rule", self.threshold_rule, formats.THRESHOLD_RULES)
        _check_choice("smoothing", self.smoothing, SMOOTHING_MODES)
        _check_rotation(self.rotation)
        if self.format == FLOAT_FORMAT and (self.smoothing != "none" or self.rotation):
            raise ValueError(f"smoothing and rotation need a quantized format, not {FLOAT_FORMAT!r} (pass-through)")

    @functools.cached_property
    def spec(self) -> formats.WeightFormat | None:
        """The WeightFormat of `format`, resolved once (None for the float pass-through). `format`
        stays the string that checkpoints and reports carry."""
        return formats.FORMATS.get(self.format)

    @property
    def activation_group_size(self) -> int:
        """The activation groups the weight format reads: group_size for grouped formats, else 0 (per row)."""
        return self.group_size if self.spec is not None and self.spec.grouped else 0

    @property
    def has_input_transform(self) -> bool:
        return self.smoothing != "none" or self.rotation > 0

    @property
    def is_float(self) -> bool:
        return self.format == FLOAT_FORMAT

    def weight_only(self) -> "LayerConfig":
        """The same weight format with activations left in float (lookups and x @ P projections).

        Input transforms belong to linear layers: lookups and x @ P products have none.
        """
        return dataclasses.replace(self, activation="none", smoothing="none", rotation=0)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        # Input transforms are written only when used: checkpoints without them read as before.
        for name, default in (("smoothing", "none"), ("rotation", 0)):
            if data[name] == default:
                del data[name]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "LayerConfig":
        return cls(**_known_fields(cls, data, "layer config"))


FLOAT_LAYER = LayerConfig(FLOAT_FORMAT)


def _known_fields(cls, data: Mapping[str, Any], what: str) -> dict:
    if not isinstance(data, Mapping):
        raise ValueError(f"{what} must be a mapping, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{what} has unknown fields {unknown}; valid fields are {sorted(names)}")
    return dict(data)


def _as_patterns(argument: str, value) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    try:
        patterns = tuple(value)
    except TypeError:
        raise ValueError(f"{argument} must be a glob pattern or a sequence of them, got {value!r}") from None
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise ValueError(f"{argument} must hold glob-pattern strings, got {pattern!r}")
    return patterns


PATCH_EMBEDDING_ACTIVATIONS = ("none", "dynamic")


@dataclass(frozen=True)
class QuantConfig:
    """A whole-model conversion.

    include / exclude are fnmatch glob patterns over module (or parameter) names,
    e.g. ``"*.mlp.*"``; a name is converted when it matches an include pattern and
    no exclude pattern. Attention in_proj/out_proj are matched as
    ``"<attention name>.in_proj"`` and ``"<attention name>.out_proj"``.

    patch_embedding_activation: "none" (the patch embedding is weight-only: its dequantized
    weight in a float matmul) or "dynamic" (its unfolded patches, K = 3 p^2, quantized per patch
    to int8 and multiplied by the packed weight in the fused linear op, as a linear layer is).

    The CLIP projections (``visual.proj`` / ``text_projection`` / HF
    ``visual_projection``), the token embedding and the patch embedding are
    converted only when their flag is set *and* their name is selected by the
    patterns. Projections held as bare Parameters and both embeddings are
    weight-only (they are used as tensors or lookups, not as Linear calls).

    rotation: 0, or the block size of an online block-Hadamard rotation of every quantized
    linear's input (see LayerConfig): outlier channels are spread before int8 quantization,
    and the stored weights are the rotated ones. Each layer uses the largest power of 2 up
    to `rotation` that divides its in_features.
    """

    format: str = "int8"
    group_size: int | None = None
    activation: str | None = None
    threshold_rule: str = "absmean"
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    quantize_projections: bool = True
    quantize_token_embedding: bool = False
    quantize_patch_embedding: bool = False
    patch_embedding_activation: str = "none"
    rotation: int = 0
    version: int = CONFIG_VERSION

    def __post_init__(self):
        # LayerConfig owns the format / group / activation / threshold / rotation rules.
        layer = self.layer
        object.__setattr__(self, "group_size", layer.group_size)
        object.__setattr__(self, "activation", layer.activation)
        object.__setattr__(self, "include", _as_patterns("include", self.include))
        object.__setattr__(self, "exclude", _as_patterns("exclude", self.exclude))
        for flag in ("quantize_projections", "quantize_token_embedding", "quantize_patch_embedding"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag} must be True or False, got {getattr(self, flag)!r}")
        if self.patch_embedding_activation not in PATCH_EMBEDDING_ACTIVATIONS:
            raise ValueError(f"patch_embedding_activation must be one of {PATCH_EMBEDDING_ACTIVATIONS}, "
                             f"got {self.patch_embedding_activation!r}")
        if self.patch_embedding_activation != "none" and not self.quantize_patch_embedding:
            raise ValueError(f"patch_embedding_activation={self.patch_embedding_activation!r} needs "
                             "quantize_patch_embedding=True")
        if self.version != CONFIG_VERSION:
            raise ValueError(
                f"version must be {CONFIG_VERSION} (the config version this pyclipq understands), got {self.version!r}"
            )

    @property
    def layer(self) -> LayerConfig:
        return LayerConfig(self.format, self.group_size, self.activation, self.threshold_rule, rotation=self.rotation)

    @property
    def patch_layer(self) -> LayerConfig:
        """The patch embedding's layer: weight-only, or with per-patch int8 activations ("dynamic")."""
        return dataclasses.replace(self.layer.weight_only(), activation=self.patch_embedding_activation)

    def selects(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in self.include) and not any(
            fnmatch.fnmatchcase(name, p) for p in self.exclude
        )

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        if not data["rotation"]:
            del data["rotation"]
        if data["patch_embedding_activation"] == "none":  # readable by earlier versions
            del data["patch_embedding_activation"]
        data["include"] = list(self.include)
        data["exclude"] = list(self.exclude)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "QuantConfig":
        return cls(**_known_fields(cls, data, "QuantConfig"))

    @classmethod
    def preset(cls, name: str, **overrides) -> "QuantConfig":
        """A named preset, optionally with fields replaced: ``QuantConfig.preset("int4", group_size=32)``."""
        base = _preset(name)
        return dataclasses.replace(base, **overrides) if overrides else base


_MLP_ONLY = ("*.mlp.*",)

PRESETS: dict[str, QuantConfig] = {
    # int8 computes the patch embedding in int8 too: per-patch int8 activations moved ViT-B/32's
    # image-embedding cosine to fp32 from 0.99990 to 0.99990 (random weights, smooth images; the patch
    # embedding's own relative error 0.76%) and took it from ~1.3 ms to 0.4 ms at batch 1 (Zen 4, 2 cores)
    "int8": QuantConfig("int8", quantize_patch_embedding=True, patch_embedding_activation="dynamic"),
    "int4": QuantConfig("int4"),
    "int2": QuantConfig("int2"),
    "ternary": QuantConfig("ternary"),
    "int8-weight-only": QuantConfig("int8", activation="none"),
    # TernaryCLIP's Q-FFN: only the transformer MLPs are ternary.
    "ternary-qffn": QuantConfig("ternary", include=_MLP_ONLY, quantize_projections=False),
    # TernaryCLIP's Q-ALL: every linear, attention and projections included.
    "ternary-qall": QuantConfig("ternary"),
    # Q-ALL plus both embeddings: the smallest checkpoint (the >= 16x one).
    "ternary-qall-embeddings": QuantConfig(
        "ternary", quantize_token_embedding=True, quantize_patch_embedding=True
    ),
    "passthrough": QuantConfig(FLOAT_FORMAT),
}


def _preset(name: str) -> QuantConfig:
    if name not in PRESETS:
        raise ValueError(f"config must be a QuantConfig or one of {sorted(PRESETS)}, got {name!r}")
    return PRESETS[name]


def resolve_config(config: "str | QuantConfig") -> QuantConfig:
    """A preset name or a QuantConfig -> QuantConfig."""
    if isinstance(config, QuantConfig):
        return config
    if isinstance(config, str):
        return _preset(config)
    raise ValueError(f"config must be a QuantConfig or one of {sorted(PRESETS)}, got {config!r}")
