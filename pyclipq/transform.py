"""The swap registry: what replacing one named part of a model (a Target) means, kind by kind.

A Target names a module (or a tensor attribute) of a model and the kind of swap to make.
`pyclipq.convert` plans Targets from a config; a checkpoint stores them, so `pyclipq.load`
replays the same swaps on a freshly built float model (``quantize=False``: empty buffers,
filled by the state dict); `pyclipq.prepare_qat` makes the same swaps with fake-quant
projections. Every per-kind fact lives here, in the kind's `Builder`: which float object it
accepts, its sub-layers and their float weights, how many linear maps each counts as, the
module class it produces, and how to build it. Nothing here sees a config: the planner
(`pyclipq.convert.plan`) decides what is selected; the adapters in `pyclipq.models` only say
which kind a module of their CLIP implementation is.

Kinds that compute with projections (``linear`` and the attention kinds) build them through a
`Projections` factory, so one builder serves convert (`PackedProjections`: packed QuantLinears)
and QAT (fake-quant projections sharing the float Parameters, from `pyclipq.train.qat`).
Weight-only kinds (embeddings, tensor Parameters) have QAT handlers of their own
(`register_qat_handlers`), registered from the layer that owns the fake-quant modules.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
from torch import nn

from .configs import FLOAT_LAYER, LayerConfig
from .nn import PackedWeight, QuantEmbedding, QuantLinear, QuantMultiheadAttention
from .nn.attention import check_replaceable
from .nn.open_clip_attention import QuantOpenClipAttention, is_open_clip_attention
from .nn.parameter import LAYOUTS, PackedParameter, packed_parameters, quantize_parameter_

# Report kinds of converted weights; the number of "linears" each sub-layer counts as.
KINDS = ("attn_qkv", "attn_out", "mlp", "projection", "linear", "token_embedding", "patch_embedding")
NOT_LINEAR_KINDS = ("token_embedding", "patch_embedding")
ATTENTION_SUBLAYERS = ("in_proj", "out_proj")


@dataclass(frozen=True)
class Target:
    """Replace `name` in the model; `layers` / `kinds` are per sub-layer ("" when there is one)."""

    name: str
    target: str
    layers: dict[str, LayerConfig]
    kinds: dict[str, str]
    layout: str | None = None  # for "parameter" targets: see pyclipq.nn.parameter.LAYOUTS
    linears: dict[str, int] = field(default_factory=dict)  # sub-layer -> linear count (default 1)

    def sub_name(self, sub: str) -> str:
        return f"{self.name}.{sub}" if sub else self.name

    def linear_count(self, sub: str) -> int:
        if self.kinds[sub] in NOT_LINEAR_KINDS:
            return 0
        return self.linears.get(sub, 1)

    def to_dict(self) -> dict:
        data = {
            "name": self.name,
            "target": self.target,
            "layers": {sub: cfg.to_dict() for sub, cfg in self.layers.items()},
            "kinds": dict(self.kinds),
            "linears": dict(self.linears),
        }
        if self.layout is not None:
            data["layout"] = self.layout
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "Target":
        try:
            return cls(
                name=str(data["name"]),
                target=str(data["target"]),
                layers={sub: LayerConfig.from_dict(cfg) for sub, cfg in data["layers"].items()},
                kinds={sub: str(kind) for sub, kind in data["kinds"].items()},
                layout=data.get("layout"),
                linears={sub: int(n) for sub, n in data.get("linears", {}).items()},
            )
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"malformed conversion target {data!r}: {e!r}") from None


# ------------------------------------------------------------------ projections


class Projections(Protocol):
    """Makes the projection modules a builder swaps in, from a float weight [out, in] and bias."""

    quantize: bool  # fill packed buffers from the float weights (False: empty, loaded later)
    keeps_float: bool  # the new module keeps the one it replaced as ``float_module`` (QAT puts it back)

    def __call__(self, weight: torch.Tensor, bias: torch.Tensor | None, layer: LayerConfig) -> nn.Module: ...


@dataclass(frozen=True)
class PackedProjections:
    """Packed QuantLinears: what convert (``quantize=True``) and load (``quantize=False``) build."""

    quantize: bool = True
    keeps_float = False

    def __call__(self, weight, bias, layer) -> QuantLinear:
        if self.quantize:
            return QuantLinear.from_weight(weight, bias, layer)
        out_features, in_features = weight.shape
        return QuantLinear(in_features, out_features, bias is not None, layer=layer, dtype=weight.dtype,
                           device=weight.device)


# ------------------------------------------------------------------ builders

FloatWeights = dict[str, tuple[torch.Tensor, "torch.Tensor | None"]]


@dataclass(frozen=True)
class Builder:
    """One kind of swap.

    accepts(obj): the float object found at a Target's name is of this kind.
    float_weights(obj): {sub-layer: (float weight [out, in] or the tensor, bias or None)}.
    build(owner, attr, obj, target, projections): the new module, or None when it parametrized
    `owner` itself (a tensor Parameter).
    sub_layers: the sub-layers a Target of this kind configures ("" for the module itself).
    linears: sub-layer -> the linear maps it counts as, where that is not 1 (q, k and v of a
    packed in_proj are 3).
    """

    accepts: Callable[[object], bool]
    describe: str
    float_weights: Callable[[object], FloatWeights]
    build: Callable[[nn.Module, str, object, Target, Projections], "nn.Module | None"]
    produces: type | None = None  # the module class it swaps in (None: a parametrization)
    sub_layers: tuple[str, ...] = ("",)
    linears: dict[str, int] = field(default_factory=dict)
    takes_projections: bool = False  # computes with projections: QAT builds it with fake-quant ones


BUILDERS: dict[str, Builder] = {}


def register_builder(target: str, builder: Builder) -> None:
    BUILDERS[target] = builder


@dataclass(frozen=True)
class QATHandlers:
    """What QAT does to a kind that computes with no projection (a weight-only parametrization)."""

    fake_quantize: Callable[[nn.Module, str, object, Target], None]  # (owner, attr, float obj, target)
    strip: Callable[[nn.Module, str, Target], None]  # (owner, attr, target): the float object back


# Weight-only kinds' QAT handlers: pyclipq.train.qat registers them, from above, so this layer
# never imports the fake-quant modules. Projection kinds need none (see Projections).
QAT_HANDLERS: dict[str, QATHandlers] = {}


def register_qat_handlers(target: str, handlers: QATHandlers) -> None:
    if target not in BUILDERS:
        raise ValueError(f"target kind {target!r} has no builder; known: {sorted(BUILDERS)}")
    if BUILDERS[target].takes_projections:
        raise ValueError(f"target kind {target!r} computes with projections: QAT builds it with fake-quant ones")
    QAT_HANDLERS[target] = handlers


def _linear_weights(linear: nn.Linear) -> FloatWeights:
    return {"": (linear.weight, linear.bias)}


def _attention_weights(attention) -> FloatWeights:
    # nn.MultiheadAttention and open_clip's Attention both hold q, k and v as one bare
    # in_proj_weight [3E, E] and the output projection as an nn.Linear child
    return {
        "in_proj": (attention.in_proj_weight, attention.in_proj_bias),
        "out_proj": (attention.out_proj.weight, attention.out_proj.bias),
    }


def _attention_projections(attention, target: Target, projections: Projections) -> tuple[nn.Module, nn.Module]:
    weights = _attention_weights(attention)
    return tuple(projections(*weights[sub], target.layers[sub]) for sub in ATTENTION_SUBLAYERS)


def _build_linear(owner, attr, linear: nn.Linear, target: Target, projections: Projections) -> nn.Module:
    return projections(linear.weight, linear.bias, target.layers[""])


def _build_mha(owner, attr, mha: nn.MultiheadAttention, target: Target, projections: Projections) -> nn.Module:
    check_replaceable(mha)
    in_proj, out_proj = _attention_projections(mha, target, projections)
    return QuantMultiheadAttention(mha.embed_dim, mha.num_heads, dropout=mha.dropout, batch_first=mha.batch_first,
                                   in_proj=in_proj, out_proj=out_proj)


def _build_open_clip_attention(owner, attr, attention, target: Target, projections: Projections) -> nn.Module:
    return QuantOpenClipAttention(attention, *_attention_projections(attention, target, projections))


def _build_embedding(owner, attr, embedding: nn.Embedding, target: Target, projections: Projections) -> nn.Module:
    layer = target.layers[""]
    if projections.quantize:
        return QuantEmbedding.from_float(embedding, layer)
    w = embedding.weight
    return QuantEmbedding(w.shape[0], w.shape[1], layer=layer, dtype=w.dtype, device=w.device)


def _build_parameter(owner, attr, tensor: torch.Tensor, target: Target, projections: Projections) -> None:
    if target.layout not in LAYOUTS:
        raise ValueError(f"parameter target {target.name!r} needs layout in {list(LAYOUTS)}, got {target.layout!r}")
    layer = target.layers[""]
    if projections.quantize:
        packed = PackedParameter.from_float(tensor, target.layout, layer)
    else:
        packed = PackedParameter(tensor.shape, target.layout, layer, dtype=tensor.dtype, device=tensor.device)
    label(packed, target)
    quantize_parameter_(owner, attr, packed)


def _is_tensor(obj) -> bool:
    return isinstance(obj, torch.Tensor) and not isinstance(obj, nn.Module)


_ATTENTION = dict(sub_layers=ATTENTION_SUBLAYERS, linears={"in_proj": 3}, takes_projections=True)
register_builder("linear", Builder(
    lambda m: isinstance(m, nn.Linear), "torch.nn.Linear", _linear_weights, _build_linear, QuantLinear,
    takes_projections=True,
))
register_builder("multihead_attention", Builder(
    lambda m: isinstance(m, nn.MultiheadAttention), "torch.nn.MultiheadAttention", _attention_weights, _build_mha,
    QuantMultiheadAttention, **_ATTENTION,
))
register_builder("open_clip_attention", Builder(
    is_open_clip_attention, "an open_clip.transformer.Attention", _attention_weights, _build_open_clip_attention,
    QuantOpenClipAttention, **_ATTENTION,
))
register_builder("embedding", Builder(
    lambda m: isinstance(m, nn.Embedding), "torch.nn.Embedding", lambda m: {"": (m.weight, None)}, _build_embedding,
    QuantEmbedding,
))
register_builder("parameter", Builder(_is_tensor, "a tensor Parameter", lambda t: {"": (t, None)}, _build_parameter))


def label(module, target: Target, sub: str = "") -> None:
    """Name and kind a swapped-in PackedWeight, for error messages, summaries and checkpoints."""
    module.layer_name = target.sub_name(sub)
    module.kind = target.kinds[sub]


def subtarget(name: str, kind: str, layers: dict[str, LayerConfig], kinds: dict[str, str]) -> Target:
    """A Target of `kind` with the builder's linear counts (sub-layers missing from `layers` stay float)."""
    builder = BUILDERS[kind]
    full = {sub: layers.get(sub, FLOAT_LAYER) for sub in builder.sub_layers}
    return Target(name, kind, full, kinds, linears=dict(builder.linears))


class TargetError(ValueError):
    """A Target does not fit the model (missing name, wrong type or shape)."""


def owner_and_attr(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    owner_name, _, attr = name.rpartition(".")
    try:
        return model.get_submodule(owner_name), attr
    except AttributeError:
        raise TargetError(f"the model has no module {owner_name!r} (needed for {name!r})") from None


def builder_of(target: Target) -> Builder:
    builder = BUILDERS.get(target.target)
    if builder is None:
        raise TargetError(f"unknown conversion target kind {target.target!r}; known: {sorted(BUILDERS)}")
    return builder


def apply_target(model: nn.Module, target: Target, quantize: bool = True, projections: Projections | None = None) -> None:
    """Swap `target` in: packed (``quantize``: from the float weights, else empty buffers to load) or
    with the `projections` given (QAT's fake-quant ones). The new module keeps the train/eval mode
    of the one it replaces."""
    builder = builder_of(target)
    projections = projections if projections is not None else PackedProjections(quantize)
    owner, attr = owner_and_attr(model, target.name)
    obj = getattr(owner, attr, None)
    if obj is None or not builder.accepts(obj):
        raise TargetError(f"{target.name!r} must be {builder.describe}, the model has {type(obj).__name__}")
    new = builder.build(owner, attr, obj, target, projections)
    if new is None:
        return
    for sub in target.layers:
        part = new.get_submodule(sub) if sub else new
        if isinstance(part, PackedWeight):
            label(part, target, sub)
    if projections.keeps_float:
        object.__setattr__(new, "float_module", obj)  # not a submodule: its Parameters are the new one's already
    setattr(owner, attr, new.train(obj.training))


# ------------------------------------------------------------------ walking a model


def existing_tensor(model: nn.Module, name: str) -> torch.Tensor | None:
    owner_name, _, attr = name.rpartition(".")
    try:
        owner = model.get_submodule(owner_name)
    except AttributeError:
        return None
    value = getattr(owner, attr, None)
    return value if isinstance(value, torch.Tensor) else None


def existing_module(model: nn.Module, name: str, cls: type) -> nn.Module | None:
    try:
        module = model.get_submodule(name)
    except AttributeError:
        return None
    return module if isinstance(module, cls) else None


def float_weights(model: nn.Module, target: Target) -> FloatWeights:
    """The float weight (and bias) of each sub-layer of `target` in the unconverted `model`."""
    builder = builder_of(target)
    owner, attr = owner_and_attr(model, target.name)
    obj = getattr(owner, attr, None)
    if obj is None or not builder.accepts(obj):
        raise TargetError(f"{target.name!r} must be {builder.describe}, the model has {type(obj).__name__}")
    return builder.float_weights(obj)


def packed_weights(model: nn.Module, target: Target) -> dict[str, PackedWeight]:
    """The PackedWeight of each sub-layer of an applied Target."""
    builder = builder_of(target)
    if builder.produces is None:  # a parametrization on the owner
        owner, attr = owner_and_attr(model, target.name)
        return {"": next(p for p in owner.parametrizations[attr] if isinstance(p, PackedWeight))}
    module = model.get_submodule(target.name)
    return {sub: (module.get_submodule(sub) if sub else module) for sub in target.layers}


def float_weight_of_layer(model: nn.Module, layer_name: str) -> torch.Tensor | None:
    """The float weight behind a converted linear or attention sub-layer (a Target's `sub_name`)
    in the unconverted `model`, or None. Only module kinds are looked at, never bare tensors."""
    owner_name, _, attr = layer_name.rpartition(".")
    for name, sub in ((layer_name, ""), (owner_name, attr)):
        try:
            obj = model.get_submodule(name)
        except AttributeError:
            continue
        for builder in BUILDERS.values():
            if builder.produces is not None and builder.accepts(obj):
                weights = builder.float_weights(obj)
                if sub in weights:
                    return weights[sub][0]
    return None


def kind_of_module(module: nn.Module) -> str | None:
    """The target kind whose builder produced `module` (a converted model's module), or None."""
    for kind, builder in BUILDERS.items():
        if builder.produces is not None and type(module) is builder.produces:
            return kind
    return None


def targets_in_model(model: nn.Module) -> list[Target]:
    """The Targets a converted model holds, read back from its modules (what a checkpoint stores)."""
    targets, inside = [], []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in inside):
            continue
        kind = kind_of_module(module)
        if kind is None:
            continue
        inside.append(name)
        subs = {sub: (module.get_submodule(sub) if sub else module) for sub in BUILDERS[kind].sub_layers}
        targets.append(Target(
            name, kind, {s: m.layer for s, m in subs.items()}, {s: m.kind for s, m in subs.items()},
            linears=dict(BUILDERS[kind].linears),
        ))
    for owner_name, attr, packed in packed_parameters(model):
        name = f"{owner_name}.{attr}" if owner_name else attr
        targets.append(Target(name, "parameter", {"": packed.layer}, {"": packed.kind}, layout=packed.layout))
    return targets
