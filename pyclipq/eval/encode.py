"""Batched image and text encoding for any CLIP-like model.

A model here is anything with encode_image(images) and encode_text(tokens); a tokenizer is any
callable list[str] -> LongTensor, as open_clip's are. Every metric in pyclipq.eval is computed
from the features these functions return, so fp32 and quantized models go through the same code.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@dataclass
class ImageFeatures:
    features: torch.Tensor  # (n, d) float32 on the CPU
    labels: torch.Tensor | None  # (n,) when the batches carry labels


class HuggingFaceCLIP(torch.nn.Module):
    """encode_image / encode_text over a transformers CLIPModel, so it goes through the same metrics."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return _projected(self.model.get_image_features(pixel_values=images))

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return _projected(self.model.get_text_features(input_ids=tokens))


POOLINGS = ("mean", "cls", "max", "pooler")


class SentenceEncoder(torch.nn.Module):
    """A bare transformer text encoder (a transformers ``AutoModel``: BERT, MiniLM, ...) as a text tower.

    ``encode_text(token ids)`` pools the last hidden state over the non-padding tokens: "mean"
    (the sentence-transformers convention, the default), "cls" (the first token), "max", or
    "pooler" (the model's own pooler output). Padding is read from the token ids
    (``pad_token_id``), so token tensors stay the only input, as for every CLIP here. It has
    no image tower: ``encode_image`` raises.
    """

    def __init__(self, model: torch.nn.Module, pad_token_id: int, pooling: str = "mean"):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {list(POOLINGS)}, got {pooling!r}")
        if pooling == "pooler" and getattr(model, "pooler", None) is None:
            raise ValueError(f"pooling: {type(model).__name__} has no pooler; use mean, cls or max")
        self.model = model
        self.pad_token_id = int(pad_token_id)
        self.pooling = pooling

    def padding_mask(self, tokens: torch.Tensor) -> torch.Tensor:
        """bool [B, T]: True at the real tokens, False at padding."""
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.is_floating_point():
            raise ValueError(f"tokens must be a 2-D tensor of token ids, got {getattr(tokens, 'shape', type(tokens).__name__)}")
        return tokens != self.pad_token_id

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        mask = self.padding_mask(tokens)
        output = self.model(input_ids=tokens, attention_mask=mask.long())
        if self.pooling == "pooler":
            return output.pooler_output
        hidden = output.last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]
        if self.pooling == "max":
            return hidden.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(dim=1)
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        raise ValueError(f"this model is a text encoder ({type(self.model).__name__}): it has no image tower")

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.encode_text(tokens)


def _projected(output) -> torch.Tensor:
    # transformers 5 returns a model output whose pooler_output holds the projected features;
    # older versions return the tensor itself.
    return getattr(output, "pooler_output", output)


def as_clip_like(model, argument: str = "model"):
    """The model itself if it has encode_image / encode_text, a wrapper for a transformers CLIPModel."""
    if callable(getattr(model, "encode_image", None)) and callable(getattr(model, "encode_text", None)):
        return model
    if callable(getattr(model, "get_image_features", None)) and callable(getattr(model, "get_text_features", None)):
        return HuggingFaceCLIP(model)
    raise ValueError(
        f"{argument}: expected a CLIP-like model with encode_image and encode_text "
        f"(or a transformers CLIPModel), got {type(model).__name__}"
    )


def prepare_model(model, device: str | torch.device, argument: str = "model"):
    """The model as CLIP-like, moved to device and in eval mode."""
    model = as_clip_like(model, argument)
    if isinstance(model, torch.nn.Module):
        model.to(device).eval()
    return model


@torch.inference_mode()
def encode_images(
    model,
    batches: Iterable,
    *,
    device: str | torch.device = "cpu",
    normalize: bool = True,
    progress: bool = True,
    description: str = "images",
) -> ImageFeatures:
    """Encode every batch: a tensor of images, or an (images, labels, ...) tuple as DataLoaders give."""
    model = prepare_model(model, device)
    features, labels = [], []
    total = len(batches) if hasattr(batches, "__len__") else None
    for batch in tqdm(batches, total=total, desc=description, disable=not progress, leave=False):
        if isinstance(batch, (tuple, list)):
            images = batch[0]
            if len(batch) > 1:
                labels.append(torch.as_tensor(batch[1]).cpu())
        else:
            images = batch
        if not isinstance(images, torch.Tensor):
            raise ValueError(f"batches: expected image tensors (or (images, labels) tuples), got {type(images).__name__}")
        encoded = model.encode_image(images.to(device)).float()
        features.append((F.normalize(encoded, dim=-1) if normalize else encoded).cpu())
    if not features:
        raise ValueError("batches: no images to encode")
    if labels and len(labels) != len(features):
        raise ValueError("batches: some batches carry labels and others do not")
    return ImageFeatures(torch.cat(features), torch.cat(labels) if labels else None)


@torch.inference_mode()
def encode_texts(
    model,
    tokenizer,
    texts: Sequence[str],
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 256,
    normalize: bool = True,
    progress: bool = True,
    description: str = "texts",
) -> torch.Tensor:
    """Encode texts in batches; returns (len(texts), d) float32 features on the CPU."""
    if isinstance(texts, str):
        raise ValueError("texts: expected a sequence of strings, got a single string")
    if len(texts) == 0:
        raise ValueError("texts: no texts to encode")
    if batch_size <= 0:
        raise ValueError(f"batch_size: expected a positive number, got {batch_size}")
    if not callable(tokenizer):
        raise ValueError(f"tokenizer: expected a callable list[str] -> token tensor, got {type(tokenizer).__name__}")
    model = prepare_model(model, device)
    features = []
    starts = range(0, len(texts), batch_size)
    for start in tqdm(starts, desc=description, disable=not progress, leave=False):
        tokens = tokenizer(list(texts[start : start + batch_size]))
        encoded = model.encode_text(tokens.to(device)).float()
        features.append((F.normalize(encoded, dim=-1) if normalize else encoded).cpu())
    return torch.cat(features)
