"""pyclipq.convert: swap a model's linears (attention included) for pyclipq's packed layers.

Generic over nn.Module: every nn.Linear and nn.MultiheadAttention selected by
the config is replaced. The adapter of the model's implementation (open_clip,
Hugging Face, OpenAI clip; see pyclipq.models) adds the CLIP-specific parts:
projection Parameters, token and patch embeddings, custom attention classes and
modules that must stay float. The model keeps its own API (encode_image,
encode_text, forward, get_image_features, ...).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch
from torch import nn

from .configs import QuantConfig, resolve_config
from .models import Adapter, detect_adapter
from .models.base import fuse_blocks_, patch_embeddings_as_matmul_
from .nn import PackedParameter, PackedWeight
from .nn.parameter import packed_parameters
from .transform import (
    BUILDERS,
    NOT_LINEAR_KINDS,
    Target,
    apply_target,
    existing_module,
    existing_tensor,
    float_weights,
    packed_weights,
    subtarget,
)


@dataclass(frozen=True)
class LayerRecord:
    """One converted weight: `float_bytes` before, `quant_bytes` after (in memory)."""

    name: str
    kind: str
    format: str
    activation: str
    linears: int
    float_bytes: int
    quant_bytes: int
    is_float: bool = False  # left float (a sub-layer the config does not select)


@dataclass
class ConversionReport:
    implementation: str
    config: QuantConfig
    layers: list[LayerRecord] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (name, why it stays float)
    float_linears_left: list[tuple[str, int]] = field(default_factory=list)  # (module, linears in it)
    bytes_before: int = 0  # model state in memory, before and after
    bytes_after: int = 0
    fused_blocks: list[str] = field(default_factory=list)  # blocks run as fused CPU ops (pyclipq.nn.FusedBlock)
    unfused_blocks: list[tuple[str, str]] = field(default_factory=list)  # (block, why it runs unfused)

    def linears(self, prefix: str = "", quantized_only: bool = True) -> dict[str, int]:
        """Converted linears per kind under `prefix` (q, k and v of a packed in_proj count as 3)."""
        counts: dict[str, int] = {}
        for r in self.layers:
            if r.linears and r.name.startswith(prefix) and not (quantized_only and r.is_float):
                counts[r.kind] = counts.get(r.kind, 0) + r.linears
        return counts

    def total_linears(self, prefix: str = "", quantized_only: bool = True) -> int:
        return sum(self.linears(prefix, quantized_only).values())

    def __str__(self) -> str:
        lines = [
            f"pyclipq conversion ({self.implementation}): format={self.config.format}, "
            f"activation={self.config.activation}",
            f"  converted linears: {self.total_linears()} {self.linears()}",
            f"  memory: {self.bytes_before / 2**20:.2f} MiB -> {self.bytes_after / 2**20:.2f} MiB "
            f"({self.bytes_before / max(self.bytes_after, 1):.2f}x)",
        ]
        left = sum(n for _, n in self.float_linears_left)
        names = [m for m, _ in self.float_linears_left]
        shown = ", ".join(names[:4]) + (f", ... ({len(names) - 4} more)" if len(names) > 4 else "")
        lines.append(f"  float linears left: {left}" + (f" in {shown}" if left else ""))
        lines += [f"  skipped {name}: {why}" for name, why in self.skipped]
        return "\n".join(lines)


# ------------------------------------------------------------------ sizes

def _unique_tensors(model: nn.Module):
    seen = set()
    for tensor in model.state_dict(keep_vars=True).values():
        if tensor.numel() and tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        yield tensor


def state_nbytes(model: nn.Module) -> int:
    """Bytes of the model's state (parameters and persistent buffers, shared tensors once)."""
    return sum(t.numel() * t.element_size() for t in _unique_tensors(model))


def _packed_tensors(model: nn.Module) -> set[int]:
    ids = set()
    for module in model.modules():
        if isinstance(module, PackedWeight) and not module.layer.is_float:
            ids.update(id(t) for t in (module.packed_weight, module.weight_scale))
    return ids


def fp32_nbytes(model: nn.Module) -> int:
    """Bytes the model would take with every weight in float32 (packed weights counted unpacked)."""
    packed = _packed_tensors(model)
    total = 0
    for t in _unique_tensors(model):
        if id(t) in packed:
            continue
        total += t.numel() * (4 if t.is_floating_point() else t.element_size())
    for module in model.modules():
        if isinstance(module, PackedWeight) and not module.layer.is_float:
            total += module.out_features * module.in_features * 4
    return total


# ------------------------------------------------------------------ float linears

def float_linears(module: nn.Module, adapter: Adapter) -> int:
    """How many float linear maps `module` itself computes (not its children)."""
    kind = adapter.attention_kind(module)
    if kind is not None:
        return BUILDERS[kind].linears["in_proj"]  # q, k, v in the bare in_proj_weight; out_proj is a child
    if isinstance(module, nn.Linear):
        return 1
    if isinstance(module, PackedWeight) and module.layer.is_float and not isinstance(module, PackedParameter):
        return 3 if module.layer_name.endswith(".in_proj") else 1
    return 0


def count_linears(model: nn.Module, adapter: Adapter | None = None) -> int:
    """Float linear maps in `model`: an nn.Linear counts 1, an attention's packed in_proj counts 3."""
    adapter = adapter or detect_adapter(model)
    return sum(float_linears(m, adapter) for m in model.modules())


# ------------------------------------------------------------------ planning

def _selected_linear(name: str, config: QuantConfig, adapter: Adapter) -> Target | None:
    kind = adapter.linear_kind(name)
    if kind == "projection" and not config.quantize_projections:
        return None
    if not config.selects(name):
        return None
    return Target(name, "linear", {"": config.layer}, {"": kind})


ATTENTION_KINDS = {"in_proj": "attn_qkv", "out_proj": "attn_out"}  # report kinds of an attention's sub-layers


def _attention_target(name: str, kind: str, config: QuantConfig) -> Target | None:
    """The Target of an attention whose projections are swapped together, or None when neither is selected."""
    selected = {sub: config.layer for sub in BUILDERS[kind].sub_layers if config.selects(f"{name}.{sub}")}
    if not selected:
        return None
    return subtarget(name, kind, selected, dict(ATTENTION_KINDS))


def _tensor_targets(model: nn.Module, config: QuantConfig, adapter: Adapter):
    """Projection Parameters and the embeddings the adapter names, as the config asks."""
    targets, skipped = [], []
    weight_only = config.layer.weight_only()
    if config.quantize_projections:
        for name in adapter.projection_parameters:
            tensor = existing_tensor(model, name)
            if isinstance(tensor, nn.Parameter) and tensor.dim() == 2 and config.selects(name):
                targets.append(Target(name, "parameter", {"": weight_only}, {"": "projection"}, layout="in_out"))
    if config.quantize_token_embedding:
        found = [n for n in adapter.token_embeddings if existing_module(model, n, nn.Embedding) is not None]
        targets += [Target(n, "embedding", {"": weight_only}, {"": "token_embedding"}) for n in found if config.selects(n)]
        if not found:
            skipped.append(("token_embedding", f"the {adapter.name} adapter knows no token embedding in this model"))
    if config.quantize_patch_embedding:
        found = [n for n in adapter.patch_embeddings if existing_module(model, n, nn.Conv2d) is not None]
        if not found or not adapter.patch_embedding_applies(model):
            skipped.append(("patch_embedding", f"the {adapter.name} adapter knows no patch embedding in this model"))
        else:
            targets += [
                Target(f"{n}.weight", "parameter", {"": config.patch_layer}, {"": "patch_embedding"}, layout="out_rows")
                for n in found if config.selects(n)
            ]
    return targets, skipped


def plan(model: nn.Module, config: QuantConfig, adapter: Adapter) -> tuple[list[Target], list[tuple[str, str]]]:
    """The Targets `config` selects in `model`, and the modules left float with the reason."""
    targets, skipped, closed = [], [], []
    for name, module in model.named_modules():
        if not name or any(name.startswith(prefix + ".") for prefix in closed):
            continue
        reason = adapter.skip_reason(name, module)
        if reason is not None:
            closed.append(name)
            if sum(float_linears(m, adapter) for m in module.modules()):
                skipped.append((name, reason))
            continue
        attention_kind = adapter.attention_kind(module)
        if attention_kind is not None:
            # Its projections are converted together or not at all; its out_proj is no standalone Linear.
            closed.append(name)
            target = _attention_target(name, attention_kind, config)
            if target is not None:
                targets.append(target)
            continue
        if isinstance(module, nn.Linear):
            target = _selected_linear(name, config, adapter)
            if target is not None:
                targets.append(target)
    tensor_targets, tensor_skipped = _tensor_targets(model, config, adapter)
    return targets + tensor_targets, skipped + tensor_skipped


def _float_sizes(model: nn.Module, target: Target) -> dict[str, int]:
    """Bytes of each sub-layer's float weight (+ bias) before the swap."""
    return {sub: sum(t.numel() * t.element_size() for t in tensors if t is not None)
            for sub, tensors in float_weights(model, target).items()}


def _check_not_converted(model: nn.Module) -> None:
    for name, module in model.named_modules():
        if isinstance(module, PackedWeight):  # packed attention holds QuantLinear projections
            raise ValueError(f"model is already converted ({name or 'the model'} is a pyclipq {type(module).__name__}); "
                             "convert a float model")
    if next(packed_parameters(model), None) is not None:
        raise ValueError("model is already converted (it holds packed parameters); convert a float model")


def convert(model: nn.Module, config: "str | QuantConfig" = "int8", *, fuse_blocks: bool = True) -> nn.Module:
    """Quantize `model` in place and return it.

    config: a QuantConfig or one of the preset names in pyclipq.configs.PRESETS
    ("int8", "int4", "int2", "ternary", "ternary-qffn", "ternary-qall", ...).
    fuse_blocks: wrap each transformer block whose linears all took integer activations in a
    pyclipq.nn.FusedBlock (the whole block as nine calls of four fused CPU ops in inference; the original
    block's forward in training, under autograd, off the CPU and while a hook watches a layer
    inside). It changes no weight and no state-dict key.
    The report (a ConversionReport: converted linears per kind, sizes before and
    after, what stayed float and why) is recorded as ``model.pyclipq_report``.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, (nn.Linear, nn.MultiheadAttention, nn.Embedding)):
        raise ValueError(
            f"model must contain the layers to convert, got a bare {type(model).__name__}; "
            "use pyclipq.nn.QuantLinear.from_float / QuantMultiheadAttention.from_float for a single layer"
        )
    config = resolve_config(config)
    _check_not_converted(model)
    adapter = detect_adapter(model)
    targets, skipped = plan(model, config, adapter)
    patch_embeddings_as_matmul_(model, adapter)
    report = ConversionReport(adapter.name, config, skipped=skipped, bytes_before=state_nbytes(model))
    with torch.no_grad():
        for target in targets:
            float_sizes = _float_sizes(model, target)
            apply_target(model, target, quantize=True)
            for sub, weight in packed_weights(model, target).items():
                quant_bytes = sum(t.numel() * t.element_size() for t in weight._buffers.values() if t is not None)
                report.layers.append(LayerRecord(
                    target.sub_name(sub), target.kinds[sub], weight.layer.format, weight.layer.activation,
                    target.linear_count(sub), float_sizes[sub], quant_bytes, weight.layer.is_float,
                ))
    if fuse_blocks:
        report.fused_blocks, report.unfused_blocks = fuse_blocks_(model, adapter)
    report.bytes_after = state_nbytes(model)
    report.float_linears_left = [
        (name, n) for name, module in model.named_modules() if (n := float_linears(module, adapter))
    ]
    model.pyclipq_report = report
    return model


def summary(model: nn.Module, file=sys.stdout) -> str:
    """A per-layer table of a converted model (name, kind, format, bytes) and its total vs float32.

    Printed to `file` (None: not printed) and returned.
    """
    rows = []
    for name, module in model.named_modules():
        if isinstance(module, PackedWeight):
            label = module.layer_name or name
            nbytes = sum(t.numel() * t.element_size() for t in module._buffers.values() if t is not None)
            rows.append((label, module.kind, module.layer.format, module.layer.activation, nbytes))
    width = max([len(r[0]) for r in rows] + [4])
    lines = [f"{'name':<{width}}  {'kind':<15} {'format':<8} {'act':<8} {'bytes':>12}"]
    lines += [f"{n:<{width}}  {k:<15} {f:<8} {a:<8} {b:>12,}" for n, k, f, a, b in rows]
    total, fp32 = state_nbytes(model), fp32_nbytes(model)
    lines.append(f"total {total:,} bytes vs {fp32:,} bytes in float32 ({fp32 / max(total, 1):.2f}x smaller)")
    text = "\n".join(lines)
    if file is not None:
        print(text, file=file)
    return text


def linear_inventory(model: nn.Module) -> tuple[int, int]:
    """(quantized, total) linear maps of a float, quantize_dynamic or pyclipq model.

    An attention's packed in_proj counts as q, k and v, and each CLIP projection held as a
    bare Parameter (x @ P) as one, so that every contender is counted on the same maps (the
    benchmark compares pyclipq with torch's quantize_dynamic on this count).
    """
    adapter = detect_adapter(model)
    dynamic_linear = torch.ao.nn.quantized.dynamic.Linear
    quantized = 0
    for module in model.modules():
        if isinstance(module, PackedWeight) and not isinstance(module, PackedParameter):
            if not module.layer.is_float and module.kind not in NOT_LINEAR_KINDS:  # a token embedding is a lookup
                quantized += 3 if module.layer_name.endswith(".in_proj") else 1
        elif isinstance(module, dynamic_linear):
            quantized += 1
    projections = sum(isinstance(existing_tensor(model, n), torch.Tensor) for n in adapter.projection_parameters)
    packed_projections = sum(p.kind == "projection" and not p.layer.is_float for _, _, p in packed_parameters(model))
    quantized += packed_projections
    return quantized, quantized + count_linears(model, adapter) + projections - packed_projections
