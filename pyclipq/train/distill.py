"""Distillation losses for CLIP: contrastive task loss, similarity KL, feature matching.

Directions matter. Every KL here is KL(p_teacher || p_student) = sum p_t (log p_t - log p_s):
the student is pulled to cover the teacher's whole distribution ("forward" KL, as
in Hinton et al.). P4Q's eq. 14 and its official code swap the two distributions
(cross-entropy of p_s against log p_t); that is not what is computed here.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

FEATURE_KINDS = ("cosine", "mse")
HIDDEN_BLOCKS = ("all", "last")


def _check_features(name: str, features: torch.Tensor) -> None:
    if not isinstance(features, torch.Tensor) or features.dim() != 2:
        raise ValueError(f"{name} must be a 2-D [batch, dim] tensor, got {getattr(features, 'shape', type(features).__name__)}")


def similarity_logits(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale) -> torch.Tensor:
    """logit_scale * cos(image_i, text_j): [n_images, n_texts] (features normalized here)."""
    _check_features("image_features", image_features)
    _check_features("text_features", text_features)
    if image_features.shape[1] != text_features.shape[1]:
        raise ValueError(
            f"image_features and text_features must have the same width, got {image_features.shape[1]} and {text_features.shape[1]}"
        )
    return logit_scale * F.normalize(image_features, dim=-1) @ F.normalize(text_features, dim=-1).t()


def contrastive_loss(logits: torch.Tensor, positives: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE over an [n, n] image-text logit matrix.

    positives: optional [n, n] bool, True where caption j truly describes image i (the
    diagonal by default). Several positives share the target mass uniformly, so a
    batch with repeated captions does not punish the model for matching them.
    """
    if logits.dim() != 2 or logits.shape[0] != logits.shape[1]:
        raise ValueError(f"logits must be a square [n, n] image-text matrix, got {list(logits.shape)}")
    if positives is None:
        labels = torch.arange(logits.shape[0], device=logits.device)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
    if positives.shape != logits.shape or positives.dtype != torch.bool:
        raise ValueError(f"positives must be a bool tensor of shape {list(logits.shape)}, got {positives.dtype} {list(positives.shape)}")
    if not bool(positives.any(dim=1).all()) or not bool(positives.any(dim=0).all()):
        raise ValueError("positives must mark at least one positive in every row and every column")
    targets = positives.to(logits.dtype)
    image_to_text = F.cross_entropy(logits, targets / targets.sum(dim=1, keepdim=True))
    text_to_image = F.cross_entropy(logits.t(), (targets / targets.sum(dim=0, keepdim=True)).t())
    return (image_to_text + text_to_image) / 2


def kl_teacher_student(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0, dim: int = -1) -> torch.Tensor:
    """tau^2 * KL(softmax(t / tau) || softmax(s / tau)), summed over `dim`, averaged over the rest.

    The tau^2 factor keeps gradient magnitudes comparable across temperatures
    (Hinton et al., 2015). The teacher's logits get no gradient.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student_logits {list(student_logits.shape)} and teacher_logits {list(teacher_logits.shape)} must have the same shape")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=dim)
    log_p_teacher = F.log_softmax(teacher_logits.detach().float() / temperature, dim=dim)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dim=dim)
    return kl.mean() * temperature**2


def similarity_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) of the image->text and text->image similarity distributions, averaged."""
    image_to_text = kl_teacher_student(student_logits, teacher_logits, temperature, dim=1)
    text_to_image = kl_teacher_student(student_logits, teacher_logits, temperature, dim=0)
    return (image_to_text + text_to_image) / 2


def feature_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str = "cosine") -> torch.Tensor:
    """cosine: mean(1 - cos(s, t)); mse: mean squared error of the L2-normalized features."""
    if kind not in FEATURE_KINDS:
        raise ValueError(f"kind must be one of {list(FEATURE_KINDS)}, got {kind!r}")
    if student.shape != teacher.shape:
        raise ValueError(f"student {list(student.shape)} and teacher {list(teacher.shape)} features must have the same shape")
    teacher = teacher.detach()
    if kind == "cosine":
        return (1 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)).mean()
    return F.mse_loss(F.normalize(student.float(), dim=-1), F.normalize(teacher.float(), dim=-1))


@dataclass
class DistillationLoss:
    """contrastive_weight * InfoNCE + kd_weight * tau-KL(teacher || student) + feature_weight * feature loss.

    A weight of 0 switches its term off (it is then not computed at all). The KL uses
    each model's own logit scale before dividing by kd_temperature. The feature term
    compares image features and text features separately and averages them.
    """

    contrastive_weight: float = 1.0
    kd_weight: float = 1.0
    kd_temperature: float = 1.0
    feature_weight: float = 0.0
    feature_kind: str = "cosine"

    def __post_init__(self):
        for name in ("contrastive_weight", "kd_weight", "feature_weight"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        if not self.kd_temperature > 0:
            raise ValueError(f"kd_temperature must be > 0, got {self.kd_temperature!r}")
        if self.feature_kind not in FEATURE_KINDS:
            raise ValueError(f"feature_kind must be one of {list(FEATURE_KINDS)}, got {self.feature_kind!r}")
        if self.contrastive_weight == 0 and self.kd_weight == 0 and self.feature_weight == 0:
            raise ValueError("at least one of contrastive_weight, kd_weight, feature_weight must be > 0")

    @property
    def needs_teacher(self) -> bool:
        return self.kd_weight > 0 or self.feature_weight > 0

    def __call__(self, student: dict, teacher: dict | None = None, positives: torch.Tensor | None = None):
        """student / teacher: {"image_features", "text_features", "logit_scale"}. Returns (loss, parts)."""
        if self.needs_teacher and teacher is None:
            raise ValueError("teacher outputs are needed: kd_weight or feature_weight is > 0")
        logits = similarity_logits(student["image_features"], student["text_features"], student["logit_scale"])
        parts: dict[str, torch.Tensor] = {}
        total = logits.new_zeros(())
        if self.contrastive_weight > 0:
            parts["contrastive"] = contrastive_loss(logits.float(), positives)
            total = total + self.contrastive_weight * parts["contrastive"]
        if self.kd_weight > 0:
            with torch.no_grad():
                teacher_logits = similarity_logits(teacher["image_features"], teacher["text_features"], teacher["logit_scale"])
            parts["kd"] = similarity_kl(logits, teacher_logits, self.kd_temperature)
            total = total + self.kd_weight * parts["kd"]
        if self.feature_weight > 0:
            parts["feature"] = (
                feature_loss(student["image_features"], teacher["image_features"], self.feature_kind)
                + feature_loss(student["text_features"], teacher["text_features"], self.feature_kind)
            ) / 2
            total = total + self.feature_weight * parts["feature"]
        return total, parts


# ---------------------------------------------------------------- label-free (encoder) distillation


def hidden_state_loss(student: list[torch.Tensor], teacher: list[torch.Tensor],
                      mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over blocks of MSE(student, teacher) / mean(teacher^2): each block's error relative to
    the scale of its own hidden state, so that no block (say, one with large outlier channels)
    dominates the sum. The per-layer hidden-state term of TernaryBERT and BitDistiller.

    mask: optional bool [B, T], True at the tokens to match, for batch-first [B, T, C] hidden
    states: padding positions are left out (their states feed nothing the model outputs).
    """
    if len(student) != len(teacher) or not teacher:
        raise ValueError(f"student ({len(student)}) and teacher ({len(teacher)}) must give the same, non-zero "
                         "number of hidden states")
    terms = []
    for s, t in zip(student, teacher):
        if s.shape != t.shape:
            raise ValueError(f"student {list(s.shape)} and teacher {list(t.shape)} hidden states must have the same shape")
        s, t = s.float(), t.detach().float()
        if mask is not None:
            if mask.dtype != torch.bool or tuple(mask.shape) != tuple(t.shape[:2]):
                raise ValueError(f"mask must be a bool tensor of the hidden states' [batch, tokens] = {list(t.shape[:2])}, "
                                 f"got {mask.dtype} {list(mask.shape)}")
            s, t = s[mask], t[mask]
        terms.append(F.mse_loss(s, t) / t.pow(2).mean().clamp_min(1e-12))
    return torch.stack(terms).mean()


def attention_map_loss(student: list[torch.Tensor], teacher: list[torch.Tensor],
                       mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over blocks of KL(teacher || student) between the attention distributions of each query
    row, softmax over the keys of the scores [B, heads, T, T] (Q K^T * scale): the attention term of
    TernaryBERT (its MSE on the scores) and MiniLM (KL on the maps), as a KL so that a row's
    shift-invariant scores are compared as the distribution the model uses.

    mask: optional bool [B, T], True at the real tokens: padding keys get no probability on either
    side, and padding query rows are left out. No causal mask is applied: in a causal text tower
    (transformers' CLIP text model) the scores of future keys, which the model masks, are matched
    too; they are the teacher's, so this costs signal, not correctness.
    """
    if len(student) != len(teacher) or not teacher:
        raise ValueError(f"student ({len(student)}) and teacher ({len(teacher)}) must give the same, non-zero "
                         "number of attention maps")
    terms = []
    for s, t in zip(student, teacher):
        if s.shape != t.shape or s.dim() != 4 or s.shape[-1] != s.shape[-2]:
            raise ValueError(f"student {list(s.shape)} and teacher {list(t.shape)} attention scores must have one "
                             "shape [batch, heads, tokens, tokens]")
        s, t = s.float(), t.detach().float()
        if mask is not None:
            if mask.dtype != torch.bool or tuple(mask.shape) != (t.shape[0], t.shape[-1]):
                raise ValueError(f"mask must be a bool tensor of the scores' [batch, tokens] = "
                                 f"{[t.shape[0], t.shape[-1]]}, got {mask.dtype} {list(mask.shape)}")
            # a finite fill: exp underflows to exactly 0 and 0 * (log p_t - log p_s) stays 0 (-inf gives nan)
            padding = ~mask[:, None, None, :]
            s, t = s.masked_fill(padding, -1e4), t.masked_fill(padding, -1e4)
        log_s, log_t = F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1)
        kl = (log_t.exp() * (log_t - log_s)).sum(-1)  # [B, heads, T]
        terms.append(kl.transpose(1, 2)[mask].mean() if mask is not None else kl.mean())
    return torch.stack(terms).mean()


@dataclass
class EncoderDistillationLoss:
    """embedding_weight * feature loss of the output embeddings + hidden_weight * hidden_state_loss
    of every block's output + attention_weight * attention_map_loss of every block's attention,
    per tower (image, text), averaged over the towers a batch has.

    Label-free: it needs only the teacher's outputs on the same inputs. A weight of 0 switches its
    term off (the block outputs are then not even captured).
    """

    embedding_weight: float = 1.0
    hidden_weight: float = 1.0
    embedding_kind: str = "cosine"
    hidden_blocks: str = "all"  # "all": every block's output; "last": the last block's only
    # match block outputs at the real tokens only, where the model says which are padding
    # (encoder_outputs' "mask": a SentenceEncoder's pad tokens)
    mask_padding: bool = True
    # attention maps of every block (transformers' BERT-like and CLIP attention; not
    # nn.MultiheadAttention). Off here; recipes.default_loss turns it on where the model shows its
    # maps (MiniLM ternary at 300 steps: 0.8688 -> 0.8725, benchmarks/README.md)
    attention_weight: float = 0.0

    def __post_init__(self):
        if self.hidden_blocks not in HIDDEN_BLOCKS:
            raise ValueError(f"hidden_blocks must be one of {list(HIDDEN_BLOCKS)}, got {self.hidden_blocks!r}")
        for name in ("embedding_weight", "hidden_weight", "attention_weight"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        if self.embedding_kind not in FEATURE_KINDS:
            raise ValueError(f"embedding_kind must be one of {list(FEATURE_KINDS)}, got {self.embedding_kind!r}")
        if self.embedding_weight == 0 and self.hidden_weight == 0 and self.attention_weight == 0:
            raise ValueError("at least one of embedding_weight, hidden_weight, attention_weight must be > 0")

    needs_teacher = True

    def __call__(self, student: dict, teacher: dict):
        """student / teacher: {tower: {"embedding": [B, D], "hidden": [block outputs], optional
        "attention": [block attention scores] and "mask": bool [B, T] of the real tokens}}.
        Returns (loss, parts)."""
        if set(student) != set(teacher) or not student:
            raise ValueError(f"student towers {sorted(student)} and teacher towers {sorted(teacher)} must match")
        parts: dict[str, torch.Tensor] = {}
        totals = []
        for tower in sorted(student):
            s, t = student[tower], teacher[tower]
            total = s["embedding"].new_zeros((), dtype=torch.float32)
            if self.embedding_weight > 0:
                parts[f"{tower}_embedding"] = feature_loss(s["embedding"], t["embedding"], self.embedding_kind)
                total = total + self.embedding_weight * parts[f"{tower}_embedding"]
            if self.hidden_weight > 0 and t["hidden"]:  # a tower may have no repeated blocks
                pick = slice(None) if self.hidden_blocks == "all" else slice(-1, None)
                mask = t.get("mask") if self.mask_padding else None
                parts[f"{tower}_hidden"] = hidden_state_loss(s["hidden"][pick], t["hidden"][pick], mask)
                total = total + self.hidden_weight * parts[f"{tower}_hidden"]
            if self.attention_weight > 0 and t.get("attention"):
                mask = t.get("mask") if self.mask_padding else None
                parts[f"{tower}_attention"] = attention_map_loss(s["attention"], t["attention"], mask)
                total = total + self.attention_weight * parts[f"{tower}_attention"]
            totals.append(total)
        return torch.stack(totals).mean(), parts
