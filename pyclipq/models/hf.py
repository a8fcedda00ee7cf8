"""The Hugging Face adapter (transformers CLIPModel and the other CLIP* classes).

Attention is plain nn.Linear (``q_proj`` / ``k_proj`` / ``v_proj`` / ``out_proj``),
the MLP is ``fc1`` / ``fc2``, the projections are nn.Linear
(``visual_projection`` / ``text_projection``), so the generic Linear swap covers
them. The token embedding is ``text_model.embeddings.token_embedding``; the patch
embedding ``vision_model.embeddings.patch_embedding`` is quantized weight-only
(CLIPVisionEmbeddings reads its ``.weight.dtype``).
"""
from __future__ import annotations

from ..nn import BlockParts
from .base import Adapter, activation_name


class HuggingFaceClipAdapter(Adapter):
    name = "hf"
    projection_linears = ("visual_projection", "text_projection")
    token_embeddings = ("text_model.embeddings.token_embedding",)
    patch_embeddings = ("vision_model.embeddings.patch_embedding",)
    # CLIPEncoderLayer: x + self_attn(layer_norm1(x)), then x + mlp(layer_norm2(x))
    pre_norm_consumers = {
        "layer_norm1": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        "layer_norm2": ("mlp.fc1",),
    }

    def matches(self, model) -> bool:
        return any(c.__module__.startswith("transformers.models.clip.") for c in type(model).__mro__)

    def block_parts(self, module):
        """CLIPEncoderLayer: layer_norm1, self_attn (q_proj, k_proj, v_proj, out_proj), layer_norm2,
        mlp (fc1, activation_fn, fc2)."""
        if type(module).__name__ != "CLIPEncoderLayer":
            return None
        return BlockParts("layer_norm1", "self_attn", "layer_norm2", "mlp.fc1", "mlp.fc2",
                          activation_name(module.mlp.activation_fn), "hf", projections=("q_proj", "k_proj", "v_proj"))
