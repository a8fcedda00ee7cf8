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

from ..nn.open_clip_attention import is_open_clip_attention
from .base import Adapter, final_fused_block


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

    def pooled_rows(self, model, images=None, tokens=None):
        """CLIP.encode_image with a VisionTransformer pooling its class token (no attention pooling,
        no output tokens): row 0. CLIP.encode_text: the row its text_pool_type reads, found by
        open_clip's own text_global_pool applied to the token positions. CustomTextCLIP's text
        tower and pools over every token: None."""
        if images is not None:
            visual = getattr(model, "visual", None)
            if (visual is None or getattr(visual, "pool_type", None) != "tok" or getattr(visual, "attn_pool", None) is not None
                    or getattr(visual, "output_tokens", True)):
                return None
            final = _final_block(getattr(visual, "transformer", None))
            return None if final is None else (final, torch.zeros(images.shape[0], dtype=torch.long))
        final = _final_block(getattr(model, "transformer", None)) if hasattr(model, "token_embedding") else None
        pool_type, eos = getattr(model, "text_pool_type", None), getattr(model, "text_eos_id", None)
        if tokens is None or final is None or tokens.dim() != 2 or pool_type is None or (pool_type == "eos" and eos is None):
            return None
        try:
            from open_clip.transformer import text_global_pool
        except ImportError:  # an open_clip that pools inline: nothing to ask
            return None
        tokens = tokens.cpu()
        positions = torch.arange(tokens.shape[1]).expand(tokens.shape).unsqueeze(-1)  # [B, T, 1]: each token's row
        picked = text_global_pool(positions, tokens, pool_type, eos_token_id=eos)
        return (final, picked[:, 0]) if picked.dim() == 2 else None  # [B, T, 1]: the pool reads every token

    def attention_kind(self, module):
        return "open_clip_attention" if is_open_clip_attention(module) else super().attention_kind(module)


def _final_block(transformer):
    """The last of an open_clip Transformer's resblocks, if it is fused."""
    return final_fused_block(getattr(transformer, "resblocks", None))
