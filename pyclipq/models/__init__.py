"""Per-implementation adapters: the CLIP-specific names convert needs."""
from __future__ import annotations

from torch import nn

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


__all__ = ["ADAPTERS", "Adapter", "QuantOpenClipAttention", "detect_adapter", "get_adapter"]
