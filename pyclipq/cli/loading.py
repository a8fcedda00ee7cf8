"""Building or loading a CLIP model by name, for the CLI and the benchmarks.

Model specs:
- ``ViT-B-32`` (any open_clip architecture name), with ``pretrained=None`` for random
  weights, an open_clip pretrained tag (needs the internet or a warm cache), or a path
  to a local checkpoint file;
- ``hf:<id or local dir>``: a Hugging Face ``CLIPModel``, or any other model ``AutoModel`` loads,
  as a text encoder (pyclipq.eval.encode.SentenceEncoder: mean pooling over the non-padding
  tokens, or the pooling a sentence-transformers directory declares); local dirs work offline;
- ``openai:<path.pt>``: an OpenAI ``clip`` checkpoint saved locally, read with
  ``torch.load(weights_only=True)`` (never unpickled);
- ``testbed``: pyclipq's tiny trained CLIP (shipped with the package).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..configs import QuantConfig, resolve_config
from ..eval.encode import SentenceEncoder, as_clip_like
from ..models import pooled_only
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
    family: str  # "open_clip" | "hf" | "hf-encoder" | "openai" | "testbed"
    label: str  # what a report should call it, e.g. "ViT-B-32 (random weights)"
    preprocess: Callable | None = None  # PIL image -> model-ready tensor (None: no image tower)


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
    """A transformers CLIPModel, or any other model AutoModel loads as a bare text encoder."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=os.path.isdir(path))
    except Exception as e:
        raise ModelLoadError(f"could not load Hugging Face model {path!r} ({type(e).__name__}: {str(e)[:160]})") from e
    if config.model_type == "clip":
        return _hf_clip(path)
    return _hf_encoder(path, config)


def sentence_transformers_settings(path: str) -> tuple[str | None, int | None]:
    """(pooling, max sequence length) that a sentence-transformers directory declares, or Nones.

    Its ``modules.json`` names a Pooling module whose ``config.json`` sets the pooling mode;
    ``sentence_bert_config.json`` the max_seq_length the model was trained with."""

    root = Path(path)
    pooling = max_length = None
    try:
        modules = json.loads((root / "modules.json").read_text())
        folder = next(m["path"] for m in modules if m.get("type", "").endswith("Pooling"))
        settings = json.loads((root / folder / "config.json").read_text())
        modes = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max"}
        pooling = next((mode for key, mode in modes.items() if settings.get(key)), None)
    except (OSError, ValueError, StopIteration, KeyError, TypeError):
        pass
    try:
        max_length = int(json.loads((root / "sentence_bert_config.json").read_text())["max_seq_length"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return pooling, max_length


def _hf_encoder(path: str, config) -> LoadedModel:
    """A bare encoder as a text tower: the embedding is the mean of the last hidden state over the
    non-padding tokens (the sentence-transformers convention), or the pooling its
    sentence-transformers directory declares; the model's own pooler is not used by default."""
    from transformers import AutoModel, AutoTokenizer

    local = os.path.isdir(path)
    try:
        model = AutoModel.from_pretrained(path, local_files_only=local).eval()
        tok = AutoTokenizer.from_pretrained(path, local_files_only=local)
    except Exception as e:
        raise ModelLoadError(f"could not load Hugging Face encoder {path!r} ({type(e).__name__}: {str(e)[:160]})") from e
    if tok.pad_token_id is None:
        raise ModelLoadError(f"Hugging Face encoder {path!r}: its tokenizer has no pad token, so padding cannot be told apart")
    pooling, max_length = sentence_transformers_settings(path) if local else (None, None)
    pooling = pooling or "mean"
    max_length = min(max_length or tok.model_max_length, getattr(config, "max_position_embeddings", 512))

    def tokenize(texts):
        return tok(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")["input_ids"]

    encoder = SentenceEncoder(model, tok.pad_token_id, pooling)
    return LoadedModel(encoder, tokenize, 0, max_length, config.vocab_size, "hf-encoder",
                       f"hf:{path} (text encoder, {pooling} pooling)")


def _hf_clip(path: str) -> LoadedModel:
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
    with pooled_only(loaded.model, images=images, tokens=tokens):
        return model.encode_image(images) if images is not None else model.encode_text(tokens)


def config_from_args(args) -> QuantConfig:
    """--format (a format or preset name) with the --group-size, --activation and --rotation given."""
    config = resolve_config(args.format)
    overrides = {}
    if getattr(args, "group_size", None) is not None:
        overrides["group_size"] = args.group_size
    if getattr(args, "activation", None) is not None:
        overrides["activation"] = args.activation
    if getattr(args, "rotation", None):
        overrides["rotation"] = args.rotation
    return QuantConfig.preset(args.format, **overrides) if overrides else config
