"""The OpenAI CLIP adapter (`clip.model.CLIP`, shipped by the clip-anytorch package).

Same block names as open_clip: nn.MultiheadAttention ``attn`` (sequence-first),
``mlp.c_fc`` / ``mlp.c_proj``; ``visual.proj`` and ``text_projection`` are
Parameters used as ``x @ P``; ``token_embedding``; the ViT patch embedding is
``visual.conv1`` (CLIP.dtype reads its ``.weight.dtype``, which a packed
parameter keeps answering). ResNet towers' AttentionPool2d reads its q/k/v/c_proj
weights directly, so those stay float.
"""
from __future__ import annotations

from .base import Adapter


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

    def skip_reason(self, name, module):
        if type(module).__name__ == "AttentionPool2d" and _is_openai_clip(type(module)):
            return "AttentionPool2d passes its q/k/v/c_proj weights to F.multi_head_attention_forward directly"
        return super().skip_reason(name, module)

    def patch_embedding_applies(self, model) -> bool:
        # Only the ViT tower's conv1 is a patch embedding; a ResNet's conv1 is a 3x3 stem.
        visual = getattr(model, "visual", None)
        return type(visual).__name__ == "VisionTransformer"
