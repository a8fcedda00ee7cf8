"""What convert does to one named part of a model (a Target), and the builders that do it.

A Target names a module (or a tensor attribute) of the model and how to replace
it. `pyclipq.convert` plans Targets from a config; a checkpoint stores them, so
`pyclipq.load` replays exactly the same swaps on a freshly built float model
(with quantize=False: empty buffers, filled by the state dict).

Adapters (one per CLIP implementation) know the CLIP-specific names: which
Parameters are projections, where the embeddings are, which attention classes
need their own replacement, which modules must be left alone.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..configs import FLOAT_LAYER, LayerConfig
from ..nn import PatchConv2d, QuantEmbedding, QuantLinear, QuantMultiheadAttention
from ..nn.attention import unsupported_reason
from ..nn.parameter import LAYOUTS, PackedParameter, packed_parameters, quantize_parameter_

# Report kinds of converted weights; the number of "linears" each sub-layer counts as.
KINDS = ("attn_qkv", "attn_out", "mlp", "projection", "linear", "token_embedding", "patch_embedding")
NOT_LINEAR_KINDS = ("token_embedding", "patch_embedding")


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


def attention_target(name: str, config, target: str) -> Target | None:
    """Target for an attention with a packed in_proj and an out_proj, or None when neither is selected."""
    selected = {sub: config.selects(f"{name}.{sub}") for sub in ("in_proj", "out_proj")}
    if not any(selected.values()):
        return None
    layers = {sub: (config.layer if on else FLOAT_LAYER) for sub, on in selected.items()}
    return Target(name, target, layers, {"in_proj": "attn_qkv", "out_proj": "attn_out"}, linears={"in_proj": 3})


# ------------------------------------------------------------------ builders

@dataclass(frozen=True)
class Builder:
    """Swaps one Target in: `accepts(obj)` checks the float object found at the name."""

    accepts: Callable[[object], bool]
    describe: str
    build: Callable[[nn.Module, str, object, Target, bool], None]  # (owner, attr, float obj, target, quantize)
    produces: type | None = None  # the module class it swaps in (None: a parametrization)


BUILDERS: dict[str, Builder] = {}


def register_builder(target: str, builder: Builder) -> None:
    BUILDERS[target] = builder


@dataclass(frozen=True)
class QATHandlers:
    """What QAT does to one target kind: swap in its fake-quant twin, and undo that."""

    fake_quantize: Callable[[nn.Module, str, object, Target, bool], None]  # (owner, attr, float obj, target, exact)
    strip: Callable[[nn.Module, str, Target], None]  # (owner, attr, target): the float object back
    # (owner, attr, packed module): a frozen differentiable twin of what the builder made, or None
    # when that already is differentiable (packed parameters and embeddings return float tensors)
    twin: Callable[[nn.Module, str, nn.Module], None] | None = None


# Keyed like BUILDERS (one registry of target kinds): pyclipq.train.qat registers the handlers of
# every kind it covers, from above, so this layer never imports the fake-quant modules.
QAT_HANDLERS: dict[str, QATHandlers] = {}


def register_qat_handlers(target: str, handlers: QATHandlers) -> None:
    if target not in BUILDERS:
        raise ValueError(f"target kind {target!r} has no builder; known: {sorted(BUILDERS)}")
    QAT_HANDLERS[target] = handlers


def label(module, target: Target, sub: str = "") -> None:
    """Name and kind a swapped-in PackedWeight, for error messages, summaries and checkpoints."""
    module.layer_name = target.sub_name(sub)
    module.kind = target.kinds[sub]


def _build_linear(owner, attr, linear: nn.Linear, target: Target, quantize: bool) -> None:
    layer = target.layers[""]
    if quantize:
        new = QuantLinear.from_float(linear, layer)
    else:
        new = QuantLinear(
            linear.in_features, linear.out_features, linear.bias is not None,
            layer=layer, dtype=linear.weight.dtype, device=linear.weight.device,
        )
    label(new, target)
    setattr(owner, attr, new)


def _build_mha(owner, attr, mha: nn.MultiheadAttention, target: Target, quantize: bool) -> None:
    new = QuantMultiheadAttention.from_float(mha, target.layers["in_proj"], target.layers["out_proj"], quantize=quantize)
    label(new.in_proj, target, "in_proj")
    label(new.out_proj, target, "out_proj")
    setattr(owner, attr, new)


def _build_embedding(owner, attr, embedding: nn.Embedding, target: Target, quantize: bool) -> None:
    layer = target.layers[""]
    if quantize:
        new = QuantEmbedding.from_float(embedding, layer)
    else:
        w = embedding.weight
        new = QuantEmbedding(w.shape[0], w.shape[1], layer=layer, dtype=w.dtype, device=w.device)
    label(new, target)
    setattr(owner, attr, new)


def _build_parameter(owner, attr, tensor: torch.Tensor, target: Target, quantize: bool) -> None:
    if target.layout not in LAYOUTS:
        raise ValueError(f"parameter target {target.name!r} needs layout in {list(LAYOUTS)}, got {target.layout!r}")
    layer = target.layers[""]
    if quantize:
        packed = PackedParameter.from_float(tensor, target.layout, layer)
    else:
        packed = PackedParameter(tensor.shape, target.layout, layer, dtype=tensor.dtype, device=tensor.device)
    label(packed, target)
    quantize_parameter_(owner, attr, packed)


register_builder("linear", Builder(lambda m: isinstance(m, nn.Linear), "torch.nn.Linear", _build_linear, QuantLinear))
register_builder(
    "multihead_attention",
    Builder(
        lambda m: isinstance(m, nn.MultiheadAttention), "torch.nn.MultiheadAttention", _build_mha, QuantMultiheadAttention
    ),
)
register_builder(
    "embedding", Builder(lambda m: isinstance(m, nn.Embedding), "torch.nn.Embedding", _build_embedding, QuantEmbedding)
)
register_builder(
    "parameter",
    Builder(lambda t: isinstance(t, torch.Tensor) and not isinstance(t, nn.Module), "a tensor Parameter", _build_parameter),
)


class TargetError(ValueError):
    """A Target does not fit the model (missing name, wrong type or shape)."""


def apply_target(model: nn.Module, target: Target, quantize: bool) -> None:
    builder = BUILDERS.get(target.target)
    if builder is None:
        raise TargetError(f"unknown conversion target kind {target.target!r}; known: {sorted(BUILDERS)}")
    owner_name, _, attr = target.name.rpartition(".")
    try:
        owner = model.get_submodule(owner_name)
    except AttributeError:
        raise TargetError(f"the model has no module {owner_name!r} (needed for {target.name!r})") from None
    obj = getattr(owner, attr, None)
    if obj is None or not builder.accepts(obj):
        raise TargetError(f"{target.name!r} must be {builder.describe}, the model has {type(obj).__name__}")
    builder.build(owner, attr, obj, target, quantize)


# ------------------------------------------------------------------ adapters

QKV_LEAVES = ("q_proj", "k_proj", "v_proj")
MLP_LEAVES = ("c_fc", "fc1", "fc2")


class Adapter:
    """The generic adapter: any nn.Module; subclasses add one CLIP implementation's names."""

    name = "generic"
    projection_parameters: tuple[str, ...] = ()  # Parameters used as x @ P, P [in, out]
    projection_linears: tuple[str, ...] = ()  # nn.Linear modules that are CLIP's projections
    token_embeddings: tuple[str, ...] = ()
    patch_embeddings: tuple[str, ...] = ()  # conv modules whose weight is quantized weight-only
    # Pre-LN blocks: a LayerNorm child whose output feeds only these linears (paths relative to
    # the block), so that per-input-channel factors fold into it exactly (SmoothQuant). Empty
    # for the generic adapter: a post-LN norm's output also feeds the residual stream.
    pre_norm_consumers: dict[str, tuple[str, ...]] = {}

    def matches(self, model: nn.Module) -> bool:
        return True

    def norm_folds(self, model: nn.Module):
        """(LayerNorm name, [names of the linears it alone feeds]) for every pre-LN block of `model`."""
        for name, module in model.named_modules():
            for norm, consumers in self.pre_norm_consumers.items():
                ln = getattr(module, norm, None)
                if isinstance(ln, nn.LayerNorm) and ln.elementwise_affine and ln.bias is not None:
                    prefix = f"{name}." if name else ""
                    yield prefix + norm, [prefix + c for c in consumers]

    def skip_reason(self, name: str, module: nn.Module) -> str | None:
        """Why the linears inside `module` must stay float, or None."""
        if isinstance(module, nn.MultiheadAttention):
            return unsupported_reason(module)
        return None

    def custom_attention(self, name: str, module: nn.Module, config) -> Target | None:
        """A Target for an implementation-specific attention module, or None."""
        return None

    def custom_float_linears(self, module: nn.Module) -> int:
        """How many float linears an implementation-specific module holds outside nn.Linear children."""
        return 0

    def patch_embedding_applies(self, model: nn.Module) -> bool:
        return True

    def linear_kind(self, name: str) -> str:
        if name in self.projection_linears:
            return "projection"
        parts = name.split(".")
        leaf, parent = parts[-1], (parts[-2] if len(parts) > 1 else "")
        if leaf in QKV_LEAVES:
            return "attn_qkv"
        if leaf == "out_proj":
            return "attn_out"
        if parent == "mlp" or leaf in MLP_LEAVES:
            return "mlp"
        return "linear"


def original_class(model: nn.Module) -> type:
    """The model's own class (parametrize swaps in a generated subclass)."""
    for cls in type(model).__mro__:
        if cls.__module__ != "torch.nn.utils.parametrize":
            return cls
    return type(model)


def class_path(model: nn.Module) -> str:
    cls = original_class(model)
    return f"{cls.__module__}.{cls.__qualname__}"


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


def patch_embeddings_as_matmul_(model: nn.Module, adapter: Adapter) -> list[str]:
    """Turn the model's patch-embedding convolutions into PatchConv2d (one matmul); their names.

    Part of every conversion (and of pyclipq.load), whatever the config: it changes no
    weight, only how the float patch embedding is computed.
    """
    if not adapter.patch_embedding_applies(model):
        return []
    return [n for n in adapter.patch_embeddings
            if (conv := existing_module(model, n, nn.Conv2d)) is not None and PatchConv2d.swap_in_(conv)]


def targets_in_model(model: nn.Module) -> list[Target]:
    """The Targets a converted model holds, read back from its modules (what a checkpoint stores)."""
    by_class = {b.produces: name for name, b in BUILDERS.items() if b.produces is not None}
    targets, inside = [], []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in inside):
            continue
        kind = by_class.get(type(module))
        if kind is None:
            continue
        inside.append(name)
        if hasattr(module, "in_proj") and hasattr(module, "out_proj"):  # an attention with a packed in_proj
            subs = {"in_proj": module.in_proj, "out_proj": module.out_proj}
            targets.append(Target(
                name, kind, {s: m.layer for s, m in subs.items()}, {s: m.kind for s, m in subs.items()},
                linears={"in_proj": 3},
            ))
        else:
            targets.append(Target(name, kind, {"": module.layer}, {"": module.kind}))
    for owner_name, attr, packed in packed_parameters(model):
        name = f"{owner_name}.{attr}" if owner_name else attr
        targets.append(Target(name, "parameter", {"": packed.layer}, {"": packed.kind}, layout=packed.layout))
    return targets
