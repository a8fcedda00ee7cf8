"""Fidelity of a (quantized) model to its fp32 reference; needs images and prompts but no labels."""
from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F

from .encode import as_clip_like, encode_images, encode_texts
from .zero_shot import check_classnames, check_templates, zero_shot_classifier

# CLIP's maximum logit scale; used when a model does not carry its own temperature.
DEFAULT_LOGIT_SCALE = 100.0


def _check_paired(reference: torch.Tensor, candidate: torch.Tensor, names: str) -> None:
    if reference.shape != candidate.shape or reference.dim() != 2:
        raise ValueError(
            f"{names}: expected two (n, d) tensors of one shape, got {tuple(reference.shape)} and {tuple(candidate.shape)}"
        )


def paired_cosine(reference: torch.Tensor, candidate: torch.Tensor) -> dict[str, float]:
    """Mean and min over rows of cos(reference[i], candidate[i])."""
    _check_paired(reference, candidate, "reference, candidate")
    cosine = F.cosine_similarity(reference.double(), candidate.double(), dim=-1)
    return {"mean": cosine.mean().item(), "min": cosine.min().item()}


def top1_agreement(reference_logits: torch.Tensor, candidate_logits: torch.Tensor) -> float:
    """Fraction of rows whose argmax is the same under both models."""
    _check_paired(reference_logits, candidate_logits, "reference_logits, candidate_logits")
    return (reference_logits.argmax(dim=1) == candidate_logits.argmax(dim=1)).float().mean().item()


def similarity_kl(reference_logits: torch.Tensor, candidate_logits: torch.Tensor) -> float:
    """Mean over rows of KL(softmax(reference) || softmax(candidate)), in nats; logits already scaled."""
    _check_paired(reference_logits, candidate_logits, "reference_logits, candidate_logits")
    reference_log = F.log_softmax(reference_logits.double(), dim=1)
    candidate_log = F.log_softmax(candidate_logits.double(), dim=1)
    kl = (reference_log.exp() * (reference_log - candidate_log)).sum(dim=1)
    # Rounding can leave a tiny negative value where the distributions agree.
    return max(kl.mean().item(), 0.0)


def model_logit_scale(model) -> float:
    """exp(logit_scale) of an open_clip / OpenAI / transformers CLIP, else CLIP's maximum, 100."""
    scale = getattr(as_clip_like(model), "logit_scale", None)
    if isinstance(scale, torch.Tensor) and scale.numel() == 1:
        return math.exp(scale.item())
    return DEFAULT_LOGIT_SCALE


def compare_to_reference(
    reference_model,
    candidate_model,
    tokenizer,
    image_batches: Iterable,
    classnames: Sequence[str],
    templates: Sequence[str],
    *,
    texts: Sequence[str] | None = None,
    logit_scale: float | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 256,
    progress: bool = True,
) -> dict[str, float]:
    """How closely candidate_model reproduces reference_model on the same images and prompts.

    - image_cosine_mean / _min, text_cosine_mean / _min: cosine between the two models' embeddings
      of the same image (text); texts default to every class prompt.
    - zero_shot_top1_agreement: fraction of images both models assign to the same class, each
      model using class embeddings from its own text tower.
    - similarity_kl: mean KL(p_reference || p_candidate) of the per-image distributions over
      classes, both at the reference model's temperature (or logit_scale, if given), so the
      figure measures the embeddings and not a drifted temperature.

    image_batches is iterated twice (once per model), so pass a DataLoader or a list, not a generator.
    """
    check_classnames(classnames)
    check_templates(templates)
    if isinstance(image_batches, Iterator):
        raise ValueError("image_batches: needs to be iterable twice (a DataLoader or a list), got a one-shot iterator")
    if texts is None:
        texts = [template.format(name) for name in classnames for template in templates]
    scale = logit_scale if logit_scale is not None else model_logit_scale(reference_model)

    features = {}
    for role, model in (("reference", reference_model), ("candidate", candidate_model)):
        argument = f"{role}_model"
        model = as_clip_like(model, argument)
        images = encode_images(model, image_batches, device=device, progress=progress, description=f"{role} images")
        encoded_texts = encode_texts(
            model, tokenizer, texts, device=device, batch_size=batch_size, progress=progress, description=f"{role} texts"
        )
        classifier = zero_shot_classifier(
            model, tokenizer, classnames, templates, device=device, batch_size=batch_size, progress=progress
        )
        features[role] = (images.features, encoded_texts, scale * images.features @ classifier.T)

    reference_images, reference_texts, reference_logits = features["reference"]
    candidate_images, candidate_texts, candidate_logits = features["candidate"]
    image_cosine = paired_cosine(reference_images, candidate_images)
    text_cosine = paired_cosine(reference_texts, candidate_texts)
    return {
        "image_cosine_mean": image_cosine["mean"],
        "image_cosine_min": image_cosine["min"],
        "text_cosine_mean": text_cosine["mean"],
        "text_cosine_min": text_cosine["min"],
        "zero_shot_top1_agreement": top1_agreement(reference_logits, candidate_logits),
        "similarity_kl": similarity_kl(reference_logits, candidate_logits),
        "logit_scale": scale,
        "images": reference_images.shape[0],
        "texts": len(texts),
    }
