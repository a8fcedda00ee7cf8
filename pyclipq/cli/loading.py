"""Building or loading a CLIP model by name, for the CLI and the benchmarks.

Model specs:
- ``ViT-B-32`` (any open_clip architecture name), with ``pretrained=None`` for random
  weights, an open_clip pretrained tag (needs the internet or a warm cache), or a path
  to a local checkpoint file;
- ``hf:<id or local dir>``: a Hugging Face ``CLIPModel`` (local dirs work offline);
- ``openai:<path.pt>``: an OpenAI ``clip`` checkpoint saved locally, read with
  ``torch.load(weights_only=True)`` (never unpickled);
- ``testbed``: pyclipq's tiny trained CLIP (shipped with the package).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..eval.encode import as_clip_like
from ..testbed import load_testbed


class ModelLoadError(ValueError):
    """A user-facing failure to build or load the named model (bad name, missing file, no internet)."""


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenize: Callable[[list[str]], torch.Tensor]
    image_size: int
    context_length: int
    vocab_size: int
    family: str  # "open_clip" | "hf" | "openai" | "testbed"
    label: str  # what a report should call it, e.g. "ViT-B-32 (random weights)"
    preprocess: Callable | None = None  # PIL image -> model-ready tensor (for image datasets)


def _open_clip(name: str, pretrained: str | None) -> LoadedModel:
    import open_clip

    if name not in open_clip.list_models():
        raise ModelLoadError(
            f"model {name!r} is not an open_clip architecture; use one of open_clip.list_models() "
            f"(e.g. ViT-B-32), 'hf:<id or dir>', 'openai:<file.pt>' or 'testbed'"
        )
    if pretrained and os.path.sep in pretrained and not os.path.exists(pretrained):
        raise ModelLoadError(f"pretrained checkpoint file not found: {pretrained}")
    try:
        model = open_clip.create_model(name, pretrained=pretrained or None)
    except Exception as e:  # open_clip raises several types for download failures
        raise ModelLoadError(
            f"could not load pretrained weights {pretrained!r} for {name} ({type(e).__name__}: {str(e)[:160]}); "
            "without internet access pass a local checkpoint path as the pretrained value"
        ) from e
    model.eval()
    tokenizer = open_clip.get_tokenizer(name)
    visual_size = model.visual.image_size
    image_size = visual_size[0] if isinstance(visual_size, (tuple, list)) else int(visual_size)
    label = f"{name} ({'random weights' if not pretrained else pretrained})"
    preprocess = open_clip.image_transform(image_size, is_train=False)
    return LoadedModel(model, tokenizer, image_size, model.context_length, model.vocab_size, "open_clip", label,
                       preprocess)


def _hf(path: str) -> LoadedModel:
    from transformers import CLIPModel, CLIPTokenizer

    try:
        model = CLIPModel.from_pretrained(path, local_files_only=os.path.isdir(path)).eval()
    except Exception as e:
        raise ModelLoadError(f"could not load Hugging Face CLIP {path!r} ({type(e).__name__}: {str(e)[:160]})") from e
    try:
        tok = CLIPTokenizer.from_pretrained(path, local_files_only=os.path.isdir(path))

        def tokenize(texts):
            return tok(texts, padding="max_length", truncation=True, return_tensors="pt")["input_ids"]
    except Exception:  # a weights-only directory: token ids can still be fed directly
        tokenize = None
    cfg = model.config
    import open_clip

    # CLIP's own resize / centre-crop / normalisation, the same for every implementation
    preprocess = open_clip.image_transform(cfg.vision_config.image_size, is_train=False)
    return LoadedModel(model, tokenize, cfg.vision_config.image_size, cfg.text_config.max_position_embeddings,
                       cfg.text_config.vocab_size, "hf", f"hf:{path}", preprocess)


def _openai(path: str) -> LoadedModel:
    import clip
    from clip.model import build_model

    if not os.path.exists(path):
        raise ModelLoadError(f"OpenAI CLIP checkpoint not found: {path} (downloads are not attempted)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelLoadError(f"{path} is not a weights-only OpenAI CLIP state dict ({type(e).__name__})") from e
    model = build_model(state).float().eval()
    import open_clip

    preprocess = open_clip.image_transform(model.visual.input_resolution, is_train=False)
    return LoadedModel(model, clip.tokenize, model.visual.input_resolution, model.context_length, model.vocab_size,
                       "openai", f"openai:{os.path.basename(path)}", preprocess)


def _testbed() -> LoadedModel:
    from torchvision import transforms

    bed = load_testbed()
    model = bed.model.eval()
    # the test bed trains on images in [0, 1] at its resolution, unnormalized
    size = bed.config.image_size
    preprocess = transforms.Compose([transforms.Resize(size), transforms.CenterCrop(size), transforms.ToTensor()])
    return LoadedModel(model, bed.tokenizer, size, bed.config.context_length,
                       bed.config.vocab_size, "testbed", "pyclipq test bed (trained)", preprocess)


def load_model(spec: str, pretrained: str | None = None) -> LoadedModel:
    if not isinstance(spec, str) or not spec:
        raise ModelLoadError(f"model must be a non-empty string, got {spec!r}")
    if spec == "testbed":
        return _testbed()
    if spec.startswith("hf:"):
        return _hf(spec[3:])
    if spec.startswith("openai:"):
        return _openai(spec[7:])
    return _open_clip(spec, pretrained)


def random_inputs(loaded: LoadedModel, batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images and token ids with the model's shapes (speed and fidelity need no real data)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, loaded.image_size, loaded.image_size, generator=g)
    tokens = torch.randint(1, loaded.vocab_size - 1, (batch, loaded.context_length), generator=g)
    tokens[:, -1] = loaded.vocab_size - 1  # open_clip/OpenAI pool at argmax id: the EOT position
    return images, tokens


def encode(loaded: LoadedModel, images: torch.Tensor | None = None, tokens: torch.Tensor | None = None) -> Any:
    """Image or text embeddings through the family's own API (a transformers CLIPModel is wrapped)."""
    model = as_clip_like(loaded.model)
    return model.encode_image(images) if images is not None else model.encode_text(tokens)
