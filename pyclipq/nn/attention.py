"""QuantMultiheadAttention: nn.MultiheadAttention with quantized (packed or fake-quant) in_proj and out_proj.

nn.MultiheadAttention keeps q, k, v as one bare ``in_proj_weight`` Parameter and
reads ``out_proj.weight`` directly, so swapping Linear modules misses all of its
projections. This module holds the packed in_proj ([3E, E], rows q | k | v) and
the out_proj as QuantLinears and runs the attention core with
F.scaled_dot_product_attention.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..configs import LayerConfig
from .linear import QuantLinear


def unsupported_reason(mha: nn.MultiheadAttention) -> str | None:
    """Why `mha` cannot become a QuantMultiheadAttention, or None when it can."""
    if not mha._qkv_same_embed_dim:
        return "kdim/vdim differ from embed_dim (separate q/k/v projection weights)"
    if mha.bias_k is not None or mha.bias_v is not None:
        return "add_bias_kv=True"
    if mha.add_zero_attn:
        return "add_zero_attn=True"
    return None


def additive_mask(mask: torch.Tensor, name: str, dtype: torch.dtype) -> torch.Tensor:
    """Boolean masks (True = may not attend) become additive -inf masks, as nn.MultiheadAttention does."""
    if mask.dtype == torch.bool:
        return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))
    if not mask.is_floating_point():
        raise ValueError(f"{name} must be a bool or floating-point tensor, got {mask.dtype}")
    return mask.to(dtype)


def check_causal_hint(is_causal: bool, attn_mask) -> None:
    """nn.MultiheadAttention treats is_causal only as a hint about attn_mask: without the mask it is an error."""
    if is_causal and attn_mask is None:
        raise ValueError("is_causal=True needs the causal attn_mask as well (it is only a hint, as in nn.MultiheadAttention)")


def merged_attention_mask(attn_mask, key_padding_mask, batch, num_heads, tgt_len, src_len, dtype):
    """nn.MultiheadAttention's attn_mask and key_padding_mask as one additive mask
    broadcastable to [B, heads, L, S], or None when neither is given."""
    mask = None
    if attn_mask is not None:
        mask = additive_mask(attn_mask, "attn_mask", dtype)
        if mask.dim() == 2:
            if tuple(mask.shape) != (tgt_len, src_len):
                raise ValueError(f"attn_mask 2-D must be [L, S] = [{tgt_len}, {src_len}], got {list(mask.shape)}")
            mask = mask.view(1, 1, tgt_len, src_len)
        elif mask.dim() == 3:
            expected = (batch * num_heads, tgt_len, src_len)
            if tuple(mask.shape) != expected:
                raise ValueError(f"attn_mask 3-D must be [B*num_heads, L, S] = {list(expected)}, got {list(mask.shape)}")
            mask = mask.view(batch, num_heads, tgt_len, src_len)
        else:
            raise ValueError(f"attn_mask must be 2-D or 3-D, got {mask.dim()}-D")
    if key_padding_mask is not None:
        padding = additive_mask(key_padding_mask, "key_padding_mask", dtype)
        if tuple(padding.shape) != (batch, src_len):
            raise ValueError(f"key_padding_mask must be [B, S] = [{batch}, {src_len}], got {list(padding.shape)}")
        padding = padding.view(batch, 1, 1, src_len)
        mask = padding if mask is None else mask + padding
    return mask


def attend(q, k, v, mask, *, need_weights: bool, average_attn_weights: bool = True, dropout_p: float = 0.0):
    """The attention core on [B, heads, L|S, head_dim] tensors -> (output [B, heads, L, head_dim], weights or None).

    Without weights it is F.scaled_dot_product_attention; with weights the softmax is
    computed explicitly, as nn.MultiheadAttention does, and the weights are averaged
    over heads when asked.
    """
    if not need_weights:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p), None
    scores = (q * (1.0 / math.sqrt(q.shape[-1]))) @ k.transpose(-2, -1)
    if mask is not None:
        scores = scores + mask
    weights = scores.softmax(dim=-1)
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p)
    out = weights @ v
    return out, (weights.mean(dim=1) if average_attn_weights else weights)


class QuantMultiheadAttention(nn.Module):
    """Drop-in for nn.MultiheadAttention (self- and cross-attention, kdim = vdim = embed_dim).

    The one attention module for nn.MultiheadAttention, parameterised by its projections:
    packed QuantLinears (``from_float``, what ``convert`` builds) or fake-quant
    FakeQuantLinears sharing the original's Parameters (``with_projections``, what QAT
    builds; ``float_module`` then keeps the original to put back). Any projection
    module works that computes ``y = x W^T + b`` and has ``forward_rows(x, start, stop)``.

    Same call signature and results as the original:
    - ``attn_mask`` 2-D [L, S] or 3-D [B*num_heads, L, S], bool (True = masked) or additive float;
    - ``key_padding_mask`` [B, S] (or [S] unbatched), bool or float, merged into the mask;
    - ``batch_first`` and unbatched [L, E] inputs;
    - ``need_weights=False`` returns ``(output, None)`` through F.scaled_dot_product_attention;
    - ``need_weights=True`` (the nn.MultiheadAttention default) computes softmax(q k^T / sqrt(d) + mask)
      explicitly, as the original does, and returns the weights averaged over heads
      (or per head with ``average_attn_weights=False``).
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        in_proj_layer: LayerConfig | None = None,
        out_proj_layer: LayerConfig | None = None,
        bias: bool = True,
        dropout: float = 0.0,
        batch_first: bool = False,
        dtype=None,
        device=None,
        in_proj: nn.Module | None = None,
        out_proj: nn.Module | None = None,
    ):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        given = (in_proj is not None, out_proj is not None)
        layers = (in_proj_layer is not None, out_proj_layer is not None)
        if (given != (True, True) and layers != (True, True)) or (any(given) and any(layers)):
            raise ValueError("QuantMultiheadAttention takes either in_proj_layer and out_proj_layer (packed "
                             "QuantLinear projections are built) or in_proj and out_proj modules, not a mix")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = dropout
        self.batch_first = batch_first
        if in_proj is None:
            in_proj = QuantLinear(embed_dim, 3 * embed_dim, bias, layer=in_proj_layer, dtype=dtype, device=device)
            out_proj = QuantLinear(embed_dim, embed_dim, bias, layer=out_proj_layer, dtype=dtype, device=device)
        for name, module, rows in (("in_proj", in_proj, 3 * embed_dim), ("out_proj", out_proj, embed_dim)):
            shape = (getattr(module, "out_features", None), getattr(module, "in_features", None))
            if shape != (rows, embed_dim):
                raise ValueError(f"{name} must map {embed_dim} features to {rows}, got in_features={shape[1]}, "
                                 f"out_features={shape[0]}")
        self.in_proj = in_proj
        self.out_proj = out_proj

    @classmethod
    def from_float(
        cls, mha: nn.MultiheadAttention, in_proj_layer: LayerConfig, out_proj_layer: LayerConfig, *, quantize: bool = True
    ) -> "QuantMultiheadAttention":
        """With packed QuantLinear projections; with quantize=False the buffers are left empty (to be loaded)."""
        check_replaceable(mha)
        weight = mha.in_proj_weight
        module = cls(
            mha.embed_dim,
            mha.num_heads,
            in_proj_layer=in_proj_layer,
            out_proj_layer=out_proj_layer,
            bias=mha.in_proj_bias is not None,
            dropout=mha.dropout,
            batch_first=mha.batch_first,
            dtype=weight.dtype,
            device=weight.device,
        )
        if quantize:
            module.in_proj.load_float_weight(weight)
            module.out_proj.load_float_weight(mha.out_proj.weight)
            with torch.no_grad():
                if mha.in_proj_bias is not None:
                    module.in_proj.bias.copy_(mha.in_proj_bias)
                    module.out_proj.bias.copy_(mha.out_proj.bias)
        return module

    @classmethod
    def with_projections(cls, mha: nn.MultiheadAttention, in_proj: nn.Module, out_proj: nn.Module) -> "QuantMultiheadAttention":
        """With the given projections (e.g. fake-quant ones sharing `mha`'s Parameters); `mha` is kept as ``float_module``."""
        check_replaceable(mha)
        module = cls(mha.embed_dim, mha.num_heads, dropout=mha.dropout, batch_first=mha.batch_first,
                     in_proj=in_proj, out_proj=out_proj)
        object.__setattr__(module, "float_module", mha)  # not a submodule: its Parameters are the projections' already
        return module

    def _project(self, query, key, value, self_attention: bool):
        e = self.embed_dim
        if self_attention:
            return self.in_proj(query).chunk(3, dim=-1)
        return (
            self.in_proj.forward_rows(query, 0, e),
            self.in_proj.forward_rows(key, e, 2 * e),
            self.in_proj.forward_rows(value, 2 * e, 3 * e),
        )

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ):
        check_causal_hint(is_causal, attn_mask)
        if query.dim() not in (2, 3):
            raise ValueError(f"query must be 2-D (unbatched) or 3-D, got shape {list(query.shape)}")
        self_attention = query is key and key is value
        batched = query.dim() == 3
        if not batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        batch, tgt_len, _ = query.shape
        src_len = key.shape[1]

        q, k, v = self._project(query, key, value, self_attention)
        q = q.reshape(batch, tgt_len, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.reshape(batch, src_len, self.num_heads, self.head_dim).transpose(1, 2)
        v = v.reshape(batch, src_len, self.num_heads, self.head_dim).transpose(1, 2)
        mask = merged_attention_mask(attn_mask, key_padding_mask, batch, self.num_heads, tgt_len, src_len, q.dtype)
        dropout_p = self.dropout if self.training else 0.0
        out, weights = attend(
            q, k, v, mask, need_weights=need_weights, average_attn_weights=average_attn_weights, dropout_p=dropout_p
        )

        out = self.out_proj(out.transpose(1, 2).reshape(batch, tgt_len, self.embed_dim))
        if not batched:
            out = out.squeeze(0)
            weights = weights.squeeze(0) if weights is not None else None
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}, dropout={self.dropout}"


def check_replaceable(mha) -> None:
    """Raise ValueError unless `mha` is an nn.MultiheadAttention that QuantMultiheadAttention can replace."""
    if not isinstance(mha, nn.MultiheadAttention):
        raise ValueError(f"mha must be a torch.nn.MultiheadAttention, got {type(mha).__name__}")
    reason = unsupported_reason(mha)
    if reason is not None:
        raise ValueError(f"QuantMultiheadAttention cannot replace this nn.MultiheadAttention: {reason}")
