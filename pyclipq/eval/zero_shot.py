"""Zero-shot classification: class embeddings from prompt templates, top-k accuracy over images."""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F

from .encode import encode_images, encode_texts


def check_templates(templates: Sequence[str]) -> None:
    if isinstance(templates, str) or len(templates) == 0:
        raise ValueError("templates: expected a non-empty sequence of strings such as 'a photo of a {}.'")
    for template in templates:
        if not isinstance(template, str) or template.count("{}") != 1:
            raise ValueError(f"templates: each template needs exactly one '{{}}' slot for the class name, got {template!r}")


def check_classnames(classnames: Sequence[str]) -> None:
    if isinstance(classnames, str) or len(classnames) == 0:
        raise ValueError("classnames: expected a non-empty sequence of class names")


def zero_shot_classifier(
    model,
    tokenizer,
    classnames: Sequence[str],
    templates: Sequence[str],
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 256,
    progress: bool = True,
) -> torch.Tensor:
    """(num_classes, d) class embeddings: each the normalized mean of its normalized prompt embeddings."""
    check_classnames(classnames)
    check_templates(templates)
    prompts = [template.format(name) for name in classnames for template in templates]
    features = encode_texts(
        model, tokenizer, prompts, device=device, batch_size=batch_size, progress=progress, description="class prompts"
    )
    per_class = features.view(len(classnames), len(templates), -1)
    return F.normalize(per_class.mean(dim=1), dim=-1)


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """{"top1": fraction, "top5": fraction, ...}; k larger than the number of classes counts as all classes."""
    if logits.dim() != 2:
        raise ValueError(f"logits: expected (n, num_classes), got shape {tuple(logits.shape)}")
    if labels.shape != (logits.shape[0],):
        raise ValueError(f"labels: expected shape ({logits.shape[0]},) to match logits, got {tuple(labels.shape)}")
    if labels.numel() and (labels.min() < 0 or labels.max() >= logits.shape[1]):
        raise ValueError(f"labels: expected class ids in [0, {logits.shape[1]}), got [{int(labels.min())}, {int(labels.max())}]")
    if any(k <= 0 for k in ks):
        raise ValueError(f"ks: expected positive k values, got {tuple(ks)}")
    ranked = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = ranked == labels[:, None]
    return {f"top{k}": hits[:, :k].any(dim=1).float().mean().item() for k in ks}


def zero_shot_accuracy(
    model,
    classifier: torch.Tensor,
    batches: Iterable,
    *,
    device: str | torch.device = "cpu",
    ks: Sequence[int] = (1, 5),
    progress: bool = True,
) -> dict[str, float]:
    """Top-k accuracy of zero-shot predictions over (images, labels) batches, plus the image count "n"."""
    encoded = encode_images(model, batches, device=device, progress=progress)
    if encoded.labels is None:
        raise ValueError("batches: zero-shot accuracy needs (images, labels) batches")
    if classifier.dim() != 2 or classifier.shape[1] != encoded.features.shape[1]:
        raise ValueError(
            f"classifier: expected (num_classes, {encoded.features.shape[1]}) class embeddings, got {tuple(classifier.shape)}"
        )
    logits = encoded.features @ classifier.float().cpu().T
    return {**topk_accuracy(logits, encoded.labels, ks), "n": encoded.features.shape[0]}
