"""open_clip's own attention class (``open_clip.transformer.Attention``), computed through
replaceable projections.

Recognised by its class name and module, so that this layer does not import open_clip.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import additive_mask


def is_open_clip_attention(module) -> bool:
    cls = type(module)
    return cls.__name__ == "Attention" and cls.__module__ == "open_clip.transformer"


class QuantOpenClipAttention(nn.Module):
    """open_clip.transformer.Attention computed through replaceable q/k/v and out projections.

    Keeps the original's norms and scales (ln_q, ln_k, ln_inner, logit_scale,
    head_scale) under the same names and computes the same function: scaled-cosine
    attention when logit_scale is set, F.scaled_dot_product_attention otherwise. The
    projections are modules given to it (`pyclipq.transform` builds them): packed
    QuantLinears (what convert builds) or fake-quant twins sharing the original's Parameters
    (what QAT builds; ``float_module`` then keeps the original to put back).
    """

    def __init__(self, attention: nn.Module, in_proj: nn.Module, out_proj: nn.Module):
        super().__init__()
        if not is_open_clip_attention(attention):
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
