"""Adapters: what one CLIP implementation calls its parts.

An adapter knows the implementation-specific names: which Parameters are projections,
where the embeddings are, which kind of swap an attention module takes, which modules
must be left alone. It never sees a config: the planner (`pyclipq.convert.plan`) asks
the adapter what a module is and the config whether it is selected; the swap itself is
`pyclipq.transform`'s.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..nn import PatchConv2d
from ..nn.attention import QuantMultiheadAttention, unsupported_reason
from ..nn.linear import QuantLinear
from ..nn.fused_block import BlockParts, FusedBlock, fuse_block
from ..transform import existing_module

# ------------------------------------------------------------------ adapters


def final_fused_block(blocks) -> FusedBlock | None:
    """The last of a tower's blocks (an nn.ModuleList or None), if it is fused: where
    `Adapter.pooled_rows` can compute the pooled rows only."""
    final = blocks[-1] if blocks is not None and len(blocks) else None
    return final if isinstance(final, FusedBlock) else None


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

    def pooled_rows(self, model: nn.Module, images=None, tokens=None) -> tuple[nn.Module, torch.Tensor] | None:
        """(the tower's final block, the row of each sequence its encode_image / encode_text pools)
        when that call reads nothing else of the final block's output and the block is fused; None
        otherwise (the generic adapter: always)."""
        return None

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

    def attention_kind(self, module: nn.Module) -> str | None:
        """The swap kind (a `pyclipq.transform.BUILDERS` key) of an attention module whose q, k and v
        are one bare in_proj weight, or None when `module` is no such attention."""
        return "multihead_attention" if isinstance(module, nn.MultiheadAttention) else None

    def patch_embedding_applies(self, model: nn.Module) -> bool:
        return True

    def block_parts(self, module: nn.Module) -> BlockParts | None:
        """Where `module` keeps the parts of a pre-LN transformer block, or None when it is none.

        The layout open_clip's and OpenAI's ResidualAttentionBlock share: ``ln_1``, ``attn`` (a
        converted nn.MultiheadAttention), ``ln_2``, ``mlp.c_fc``, ``mlp.gelu`` (nn.GELU or QuickGELU),
        ``mlp.c_proj``, and no layer scale (``ls_1`` / ``ls_2`` absent or identities). OpenAI's block
        keeps its mask as the attribute ``attn_mask``; open_clip's takes it as an argument.
        """
        mlp = getattr(module, "mlp", None)
        if not (isinstance(getattr(module, "attn", None), QuantMultiheadAttention) and isinstance(mlp, nn.Sequential)
                and all(hasattr(mlp, n) for n in ("c_fc", "gelu", "c_proj"))
                and all(hasattr(module, n) for n in ("ln_1", "ln_2"))):
            return None
        if any(not isinstance(getattr(module, n, nn.Identity()), nn.Identity) for n in ("ls_1", "ls_2")):
            return None  # layer scale: not in the fused epilogue
        if len(mlp) != 3:
            return None
        openai = "attn_mask" in vars(module)  # OpenAI's block keeps its mask; open_clip's takes it
        return BlockParts("ln_1", "attn", "ln_2", "mlp.c_fc", "mlp.c_proj", activation_name(mlp.gelu),
                          "openai" if openai else "open_clip", sequence_first=not module.attn.batch_first)

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


def patch_embeddings_as_matmul_(model: nn.Module, adapter: Adapter) -> list[str]:
    """Turn the model's patch-embedding convolutions into PatchConv2d (one matmul); their names.

    Part of every conversion (and of pyclipq.load), whatever the config: it changes no
    weight, only how the float patch embedding is computed.
    """
    if not adapter.patch_embedding_applies(model):
        return []
    return [n for n in adapter.patch_embeddings
            if (conv := existing_module(model, n, nn.Conv2d)) is not None and PatchConv2d.swap_in_(conv)]


def activation_name(module: nn.Module) -> str:
    """The fused epilogue's name for an activation module: "gelu" (nn.GELU, erf form), "quick_gelu"
    (open_clip's and OpenAI's QuickGELU, transformers' QuickGELUActivation), else its class name
    (which does not fuse)."""
    if isinstance(module, nn.GELU):
        return "gelu" if module.approximate == "none" else f"gelu(approximate={module.approximate!r})"
    name = type(module).__name__
    if name in ("QuickGELU", "QuickGELUActivation"):  # open_clip / OpenAI, and transformers
        return "quick_gelu"
    if name == "GELUActivation" and getattr(module, "act", None) is torch.nn.functional.gelu:  # transformers, erf form
        return "gelu"
    return name


def fuse_blocks_(model: nn.Module, adapter: Adapter) -> tuple[list[str], list[tuple[str, str]]]:
    """Wrap every converted transformer block of `model` that fuses in a FusedBlock, in place:
    (names of the fused blocks, [(block name, why it stays unfused)]). The state dict, the module
    names and training behaviour are unchanged (FusedBlock runs the original block whenever the
    fused CPU path does not apply)."""
    fused, unfused = [], []
    for name in repeated_blocks(model):
        block = model.get_submodule(name)
        if isinstance(block, FusedBlock):
            continue
        new, reason = fuse_block(block, adapter.block_parts(block))
        if reason is not None:
            unfused.append((name, reason))
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
        fused.append(name)
    return fused, unfused


def repeated_blocks(model: nn.Module) -> list[str]:
    """The names of `model`'s transformer blocks, in order: the children of an nn.ModuleList (or of
    an nn.Sequential of two or more) whose children all share one class and each hold at least two
    linear (nn.Linear or packed QuantLinear; BERT's ``encoder.layer``, open_clip's and OpenAI's ``resblocks``, Hugging Face CLIP's
    ``layers``).
    Label-free distillation matches the student's block outputs to the teacher's by these names."""
    names = []
    for name, module in model.named_modules():
        if not (isinstance(module, nn.ModuleList) and len(module)) and not (isinstance(module, nn.Sequential)
                                                                             and len(module) >= 2):
            continue
        children = list(module.named_children())
        if len({type(child.unfused if isinstance(child, FusedBlock) else child) for _, child in children}) != 1:
            continue
        if all(sum(isinstance(m, (nn.Linear, QuantLinear)) for m in child.modules()) >= 2 for _, child in children):
            prefix = f"{name}." if name else ""
            names += [prefix + child_name for child_name, _ in children]
    return names


@dataclass(frozen=True)
class AttentionProjections:
    """Where a block's attention gets its queries and keys: the modules whose outputs are Q and K
    ([..., tokens, heads * head_dim]), and the scale its scores take (softmax(Q K^T * scale))."""

    query: str
    key: str
    heads: int
    head_dim: int
    scale: float


# (query, key, heads, head_dim, scale) attribute names of the attention modules whose query and key
# projections are modules of their own: transformers' BERT family (BertSelfAttention and its
# relatives) and CLIP (CLIPAttention).
_QUERY_KEY_ATTRIBUTES = (("query", "key", "num_attention_heads", "attention_head_size", "scaling"),
                         ("q_proj", "k_proj", "num_heads", "head_dim", "scale"))


def attention_projections(model: nn.Module, blocks: list[str]) -> list[AttentionProjections]:
    """The query / key projections of each block in `blocks` (names in `model`, as repeated_blocks
    gives them), for distilling attention maps. A block must hold exactly one attention module with
    separate query and key projections; open_clip's and OpenAI's nn.MultiheadAttention keep theirs
    inside one packed in-projection and are refused with the reason."""
    found = []
    for block in blocks:
        hits = []
        for name, module in model.get_submodule(block).named_modules():
            for q, k, heads, head_dim, scale in _QUERY_KEY_ATTRIBUTES:
                if (isinstance(getattr(module, q, None), nn.Module) and isinstance(getattr(module, k, None), nn.Module)
                        and isinstance(getattr(module, heads, None), int) and isinstance(getattr(module, head_dim, None), int)):
                    prefix = f"{block}.{name}." if name else f"{block}."
                    d = getattr(module, head_dim)
                    hits.append(AttentionProjections(prefix + q, prefix + k, getattr(module, heads), d,
                                                     float(getattr(module, scale, d ** -0.5))))
        if len(hits) != 1:
            raise ValueError(
                f"attention maps: block {block!r} of {type(model).__name__} has {len(hits)} attention modules with "
                "separate query and key projections (transformers' BERT-like .query/.key or CLIP's .q_proj/.k_proj); "
                "exactly one is needed. nn.MultiheadAttention (open_clip, OpenAI CLIP) packs them into one "
                "in-projection: distill those without attention maps (attention_weight=0)")
        found.append(hits[0])
    return found
