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

from ..nn.open_clip_attention import is_open_clip_attention
from .base import Adapter


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

    def attention_kind(self, module):
        return "open_clip_attention" if is_open_clip_attention(module) else super().attention_kind(module)
