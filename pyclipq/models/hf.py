"""The Hugging Face adapter (transformers CLIPModel and the other CLIP* classes).

Attention is plain nn.Linear (``q_proj`` / ``k_proj`` / ``v_proj`` / ``out_proj``),
the MLP is ``fc1`` / ``fc2``, the projections are nn.Linear
(``visual_projection`` / ``text_projection``), so the generic Linear swap covers
them. The token embedding is ``text_model.embeddings.token_embedding``; the patch
embedding ``vision_model.embeddings.patch_embedding`` is quantized weight-only
(CLIPVisionEmbeddings reads its ``.weight.dtype``).
"""
from __future__ import annotations

import torch

from ..nn import BlockParts
from .base import Adapter, activation_name, final_fused_block


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

    def pooled_rows(self, model, images=None, tokens=None):
        """get_image_features: the vision tower's class token, row 0. get_text_features: the row
        CLIPTextTransformer pools, by its own rule: with the legacy ``eos_token_id`` 2 the largest
        id of each sequence, else the first position of ``eos_token_id``."""
        if images is not None:
            final = _final_layer(getattr(model, "vision_model", None))
            return None if final is None else (final, torch.zeros(images.shape[0], dtype=torch.long))
        text = getattr(model, "text_model", None)
        final = _final_layer(text)
        eos = getattr(text, "eos_token_id", None)
        if tokens is None or final is None or tokens.dim() != 2 or eos is None:
            return None
        ids = tokens.cpu().to(torch.int)
        return final, (ids.argmax(dim=-1) if eos == 2 else (ids == eos).int().argmax(dim=-1))

    def block_parts(self, module):
        """CLIPEncoderLayer: layer_norm1, self_attn (q_proj, k_proj, v_proj, out_proj), layer_norm2,
        mlp (fc1, activation_fn, fc2)."""
        if type(module).__name__ != "CLIPEncoderLayer":
            return None
        return BlockParts("layer_norm1", "self_attn", "layer_norm2", "mlp.fc1", "mlp.fc2",
                          activation_name(module.mlp.activation_fn), "hf", projections=("q_proj", "k_proj", "v_proj"))


def _final_layer(tower):
    """The last CLIPEncoderLayer of a CLIPVisionTransformer / CLIPTextTransformer, if it is fused."""
    return final_fused_block(getattr(getattr(tower, "encoder", None), "layers", None))
