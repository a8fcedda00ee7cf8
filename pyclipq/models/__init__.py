"""Per-implementation adapters: the CLIP-specific names convert needs."""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..nn.fused_block import pooled_rows_only
from ..nn.open_clip_attention import QuantOpenClipAttention
from .base import Adapter
from .hf import HuggingFaceClipAdapter
from .open_clip import OpenClipAdapter
from .openai import OpenAIClipAdapter

ADAPTERS: dict[str, Adapter] = {
    a.name: a for a in (OpenClipAdapter(), HuggingFaceClipAdapter(), OpenAIClipAdapter(), Adapter())
}


def detect_adapter(model: nn.Module) -> Adapter:
    """The first adapter whose implementation built `model` (the generic one matches anything)."""
    for adapter in ADAPTERS.values():
        if adapter.matches(model):
            return adapter
    raise AssertionError("the generic adapter matches every model")


def get_adapter(name: str) -> Adapter:
    if name not in ADAPTERS:
        raise ValueError(f"adapter must be one of {sorted(ADAPTERS)}, got {name!r}")
    return ADAPTERS[name]


__all__ = ["ADAPTERS", "Adapter", "QuantOpenClipAttention", "detect_adapter", "get_adapter", "pooled_only"]


def pooled_only(model: nn.Module, images: torch.Tensor | None = None, tokens: torch.Tensor | None = None):
    """A context for one ``model.encode_image(images)`` or ``model.encode_text(tokens)`` call of a
    converted model (``get_image_features`` / ``get_text_features`` of a transformers CLIP): where
    its adapter knows which token the tower pools (the class token; the end-of-text token by the
    family's own rule), the tower's final fused block computes only that row of each sequence
    (pyclipq.nn.fused_block.pooled_rows_only): the same embeddings bit for bit, three quarters of
    one block's linear work saved. The other rows of that block's output hold its input, so only
    the pooled embedding of the call is meaningful (not, say, a last_hidden_state it also returns).
    Elsewhere a no-op. `pyclipq bench` and `pyclipq embed` use it.

        with pyclipq.pooled_only(qmodel, images=images):
            features = qmodel.encode_image(images)
    """
    if (images is None) == (tokens is None):
        raise ValueError("pooled_only: give exactly one of images and tokens")
    found = detect_adapter(model).pooled_rows(model, images=images, tokens=tokens)
    return contextlib.nullcontext() if found is None else pooled_rows_only(*found)
