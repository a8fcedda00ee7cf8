"""CLIP Linear-layer shapes: the registry benchmarks take their shapes from.

Each model lists its tokens per sample and its Linear layers as (name, N, K) with
N = out_features and K = in_features (a transformer block's four Linears plus the
final projection). A benchmark's M is tokens x batch (or the batch alone for the
pooled projection).
"""
from __future__ import annotations

MODELS = {
    # name: tokens per sample, width, MLP width, projection (N, K)
    "ViT-B/32": dict(tokens=50, width=768, mlp=3072, proj=(512, 768)),
    "ViT-B/16": dict(tokens=197, width=768, mlp=3072, proj=(512, 768)),
    "ViT-L/14": dict(tokens=257, width=1024, mlp=4096, proj=(768, 1024)),
    "text-B": dict(tokens=77, width=512, mlp=2048, proj=(512, 512)),
    "text-L": dict(tokens=77, width=768, mlp=3072, proj=(768, 768)),
}


def linear_shapes(model: str) -> list[tuple[str, int, int]]:
    """[(layer, N, K)] of one transformer block of ``model`` plus its output projection."""
    m = MODELS[model]
    w, h = m["width"], m["mlp"]
    return [("qkv", 3 * w, w), ("out_proj", w, w), ("fc1", h, w), ("fc2", w, h), ("proj", *m["proj"])]


def block_linears(model: str) -> list[tuple[str, int, int]]:
    """[(layer, N, K)] of the four Linears inside one transformer block of ``model`` (no projection)."""
    return linear_shapes(model)[:4]


def unique_shapes(models=None) -> dict[tuple[int, int], list[str]]:
    """{(N, K): ["model:layer", ...]}: models that share a shape are measured once."""
    out: dict[tuple[int, int], list[str]] = {}
    for model in models or MODELS:
        for layer, n, k in linear_shapes(model):
            out.setdefault((n, k), []).append(f"{model}:{layer}")
    return out
