"""The open_clip adapter: CLIP and CustomTextCLIP, with open_clip's own `Attention` class.

Names: ``visual.proj`` / ``text_projection`` (``text.text_projection`` in
CustomTextCLIP) are Parameters used as ``x @ P`` (text_projection may also be an
nn.Linear); the token embedding is ``token_embedding`` (``text.token_embedding``);
the patch embedding is ``visual.conv1``. Blocks use nn.MultiheadAttention or, with
``block_type='custom'``, open_clip.transformer.Attention, replaced here by
QuantOpenClipAttention. open_clip's get_cast_dtype() keeps working through
QuantLinear.int8_original_dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..configs import LayerConfig
from ..nn import QuantLinear
from ..nn.attention import additive_mask
from .base import Adapter, Builder, Target, attention_target, label, register_builder


def _is_open_clip_attention(module) -> bool:
    cls = type(module)
    return cls.__name__ == "Attention" and cls.__module__ == "open_clip.transformer"


class QuantOpenClipAttention(nn.Module):
    """open_clip.transformer.Attention computed through replaceable q/k/v and out projections.

    Keeps the original's norms and scales (ln_q, ln_k, ln_inner, logit_scale,
    head_scale) under the same names and computes the same function: scaled-cosine
    attention when logit_scale is set, F.scaled_dot_product_attention otherwise. The
    projections are modules given to it: packed QuantLinears (``quantized``, what convert
    builds) or fake-quant twins sharing the original's Parameters (``with_projections``,
    what QAT builds; ``float_module`` then keeps the original to put back).
    """

    @classmethod
    def quantized(cls, attention: nn.Module, in_proj_layer: LayerConfig, out_proj_layer: LayerConfig, *,
                  quantize: bool = True) -> "QuantOpenClipAttention":
        """With packed QuantLinear projections, quantized from the attention's weights when `quantize`."""
        if not _is_open_clip_attention(attention):
            raise ValueError(f"attention must be an open_clip.transformer.Attention, got {type(attention).__name__}")
        weight = attention.in_proj_weight
        dim = weight.shape[1]
        has_bias = attention.in_proj_bias is not None
        kwargs = dict(dtype=weight.dtype, device=weight.device)
        in_proj = QuantLinear(dim, 3 * dim, has_bias, layer=in_proj_layer, **kwargs)
        out_proj = QuantLinear(dim, dim, attention.out_proj.bias is not None, layer=out_proj_layer, **kwargs)
        if quantize:
            in_proj.load_float_weight(weight)
            out_proj.load_float_weight(attention.out_proj.weight)
            with torch.no_grad():
                if has_bias:
                    in_proj.bias.copy_(attention.in_proj_bias)
                if attention.out_proj.bias is not None:
                    out_proj.bias.copy_(attention.out_proj.bias)
        return cls(attention, in_proj, out_proj)

    @classmethod
    def with_projections(cls, attention: nn.Module, in_proj: nn.Module, out_proj: nn.Module) -> "QuantOpenClipAttention":
        """With the given projections; the original attention is kept as ``float_module``."""
        module = cls(attention, in_proj, out_proj)
        object.__setattr__(module, "float_module", attention)  # not a submodule: its Parameters are ours already
        return module

    def __init__(self, attention: nn.Module, in_proj: nn.Module, out_proj: nn.Module):
        super().__init__()
        if not _is_open_clip_attention(attention):
            raise ValueError(f"attention must be an open_clip.transformer.Attention, got {type(attention).__name__}")
        self.num_heads = attention.num_heads
        self.head_dim = attention.head_dim
        self.logit_scale_max = attention.logit_scale_max
        self.ln_q, self.ln_k, self.ln_inner = attention.ln_q, attention.ln_k, attention.ln_inner
        self.attn_drop, self.out_drop = attention.attn_drop, attention.out_drop
        self.logit_scale = attention.logit_scale
        self.head_scale = attention.head_scale
        self.in_proj = in_proj
        self.out_proj = out_proj

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.in_proj(x).chunk(3, dim=-1)
        q = q.reshape(batch, length, self.num_heads, -1).transpose(1, 2)
        k = k.reshape(batch, length, self.num_heads, -1).transpose(1, 2)
        v = v.reshape(batch, length, self.num_heads, -1).transpose(1, 2)
        if attn_mask is not None:
            if attn_mask.dim() == 3:  # [N * heads, L, L] -> [N, heads, L, L], as open_clip accepts
                attn_mask = attn_mask.reshape(batch, self.num_heads, length, length)
            attn_mask = additive_mask(attn_mask, "attn_mask", q.dtype)
        if self.logit_scale is not None:
            attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-1, -2)
            attn = attn * torch.clamp(self.logit_scale, max=self.logit_scale_max).exp()
            if attn_mask is not None:
                attn = attn + attn_mask
            x = self.attn_drop(attn.softmax(dim=-1)) @ v
        else:
            x = F.scaled_dot_product_attention(
                self.ln_q(q), self.ln_k(k), v, attn_mask=attn_mask,
                dropout_p=self.attn_drop.p if self.training else 0.0,
            )
        if self.head_scale is not None:
            x = x * self.head_scale
        x = self.ln_inner(x.transpose(1, 2).reshape(batch, length, width))
        return self.out_drop(self.out_proj(x))


def _build_open_clip_attention(owner, attr, attention, target: Target, quantize: bool) -> None:
    new = QuantOpenClipAttention.quantized(attention, target.layers["in_proj"], target.layers["out_proj"], quantize=quantize)
    label(new.in_proj, target, "in_proj")
    label(new.out_proj, target, "out_proj")
    setattr(owner, attr, new)


register_builder(
    "open_clip_attention",
    Builder(_is_open_clip_attention, "an open_clip.transformer.Attention", _build_open_clip_attention, QuantOpenClipAttention),
)


class OpenClipAdapter(Adapter):
    name = "open_clip"
    projection_parameters = ("visual.proj", "text_projection", "text.text_projection")
    projection_linears = ("text_projection", "text.text_projection")
    token_embeddings = ("token_embedding", "text.token_embedding")
    patch_embeddings = ("visual.conv1",)
    # ResidualAttentionBlock: x + attn(ln_1(x)), then x + mlp(ln_2(x))
    pre_norm_consumers = {"ln_1": ("attn.in_proj",), "ln_2": ("mlp.c_fc",)}

    def matches(self, model) -> bool:
        return type(model).__module__.startswith("open_clip.") or any(
            c.__module__.startswith("open_clip.") for c in type(model).__mro__
        )

    def custom_attention(self, name, module, config):
        if _is_open_clip_attention(module):
            return attention_target(name, config, "open_clip_attention")
        return None

    def custom_float_linears(self, module) -> int:
        return 3 if _is_open_clip_attention(module) else 0
