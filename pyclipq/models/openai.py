"""The OpenAI CLIP adapter (`clip.model.CLIP`, shipped by the clip-anytorch package).

Same block names as open_clip: nn.MultiheadAttention ``attn`` (sequence-first),
``mlp.c_fc`` / ``mlp.c_proj``; ``visual.proj`` and ``text_projection`` are
Parameters used as ``x @ P``; ``token_embedding``; the ViT patch embedding is
``visual.conv1`` (CLIP.dtype reads its ``.weight.dtype``, which a packed
parameter keeps answering). ResNet towers' AttentionPool2d reads its q/k/v/c_proj
weights directly, so those stay float.
"""
from __future__ import annotations

import torch

from .base import Adapter, final_fused_block


def _is_openai_clip(cls: type) -> bool:
    return cls.__module__ == "clip.model"


class OpenAIClipAdapter(Adapter):
    name = "openai"
    projection_parameters = ("visual.proj", "text_projection")
    token_embeddings = ("token_embedding",)
    patch_embeddings = ("visual.conv1",)
    # ResidualAttentionBlock: x + attn(ln_1(x)), then x + mlp(ln_2(x))
    pre_norm_consumers = {"ln_1": ("attn.in_proj",), "ln_2": ("mlp.c_fc",)}

    def matches(self, model) -> bool:
        return any(_is_openai_clip(c) for c in type(model).__mro__)

    def pooled_rows(self, model, images=None, tokens=None):
        """CLIP.encode_image with a VisionTransformer tower: its class token, row 0 (a ResNet
        tower: None). CLIP.encode_text: the end-of-text token, the largest id of each sequence
        (its own ``text.argmax(dim=-1)``)."""
        if images is not None:
            if not self.patch_embedding_applies(model):
                return None
            final = _final_block(model.visual.transformer)
            return None if final is None else (final, torch.zeros(images.shape[0], dtype=torch.long))
        final = _final_block(getattr(model, "transformer", None))
        if tokens is None or final is None or tokens.dim() != 2:
            return None
        return final, tokens.cpu().argmax(dim=-1)

    def skip_reason(self, name, module):
        if type(module).__name__ == "AttentionPool2d" and _is_openai_clip(type(module)):
            return "AttentionPool2d passes its q/k/v/c_proj weights to F.multi_head_attention_forward directly"
        return super().skip_reason(name, module)

    def patch_embedding_applies(self, model) -> bool:
        # Only the ViT tower's conv1 is a patch embedding; a ResNet's conv1 is a 3x3 stem.
        # by the class's MRO: a converted tower is a Parametrized<Class> (its packed conv1)
        return any(c.__name__ == "VisionTransformer" for c in type(getattr(model, "visual", None)).__mro__)


def _final_block(transformer):
    """The last of a clip.model.Transformer's resblocks, if it is fused."""
    return final_fused_block(getattr(transformer, "resblocks", None))
