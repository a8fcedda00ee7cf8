"""P4Q (shared/seeds/p4q.txt): a learnable prompt and a low-bit QAdapter on top of a frozen PTQ CLIP.

- ``QAdapter``: v = alpha * fc2(ReLU(fc1(z))) + (1 - alpha) * z, fc1/fc2 a low-bit
  bottleneck (fake-quant while training, packed QuantLinears after ``export``).
- ``P4QModel``: image features from the PTQ model's packed kernels (frozen, no
  gradient needed) through the adapter; class embeddings from the learned prompts
  through a differentiable twin of the PTQ text tower (same codes, exact math).
- ``P4QObjective``: L = L_c + lambda * KL(p_teacher || p_student), L_c the
  cross-entropy of the class logits. The paper's eq. 14 and its official code put
  the distributions the other way round (-sum p_s log p_t); we use the KL the text
  names, with the full-precision teacher as the target distribution.
- ``P4QModel.export()``: the deployable model, every linear on the packed kernels
  and the class embeddings computed once through the packed text tower.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..configs import LayerConfig
from ..nn import QuantLinear
from .distill import kl_teacher_student
from .fake_quant import FakeQuantLinear
from .prompt import PromptLearner, encode_text_embeddings
from .qat import differentiable_twin


class QAdapter(nn.Module):
    """P4Q's QAdapter: a low-bit bottleneck mixed residually with ratio alpha (eq. 11).

    fc2 starts at zero, so training starts from the PTQ model's own predictions
    (v = (1 - alpha) z has z's direction) rather than from a random perturbation.
    """

    def __init__(self, dim: int, reduction: int = 4, alpha: float = 0.2, layer: LayerConfig | str = "int8", exact: bool = True):
        super().__init__()
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be an int >= 1, got {dim!r}")
        if not isinstance(reduction, int) or reduction < 1 or dim // reduction < 1:
            raise ValueError(f"reduction must be an int in [1, dim={dim}], got {reduction!r}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
        layer = LayerConfig(layer) if isinstance(layer, str) else layer
        if not isinstance(layer, LayerConfig):
            raise ValueError(f"layer must be a LayerConfig or a format name, got {type(layer).__name__}")
        self.dim, self.hidden, self.alpha = dim, dim // reduction, float(alpha)
        self.fc1 = FakeQuantLinear(dim, self.hidden, bias=False, layer=layer, exact=exact)
        self.fc2 = FakeQuantLinear(self.hidden, dim, bias=False, layer=layer, exact=exact)
        nn.init.kaiming_uniform_(self.fc1.weight, a=5**0.5)
        nn.init.zeros_(self.fc2.weight)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.alpha * self.fc2(F.relu(self.fc1(z))) + (1 - self.alpha) * z

    def export(self) -> "QAdapter":
        """A copy whose fc1/fc2 are packed QuantLinears with the same codes (inference only)."""
        exported = QAdapter.__new__(QAdapter)
        nn.Module.__init__(exported)
        exported.dim, exported.hidden, exported.alpha = self.dim, self.hidden, self.alpha
        for name in ("fc1", "fc2"):
            fake = getattr(self, name)
            setattr(exported, name, QuantLinear.from_weight(fake.weight.detach(), None, fake.layer))
        return exported

    def extra_repr(self) -> str:
        return f"dim={self.dim}, hidden={self.hidden}, alpha={self.alpha}"


class P4QModel(nn.Module):
    """A frozen PTQ CLIP + a PromptLearner + a QAdapter (see the module doc).

    ptq_model: a converted open_clip CLIP (pyclipq.convert, or calibrated PTQ).
    Only the prompt's context vectors and the adapter's weights train.
    """

    def __init__(self, ptq_model: nn.Module, prompt: PromptLearner, adapter: QAdapter):
        super().__init__()

        if not isinstance(prompt, PromptLearner):
            raise ValueError(f"prompt must be a PromptLearner, got {type(prompt).__name__}")
        if not isinstance(adapter, QAdapter):
            raise ValueError(f"adapter must be a QAdapter, got {type(adapter).__name__}")
        self.ptq_model = ptq_model.eval().requires_grad_(False)
        self.text_twin = differentiable_twin(ptq_model).eval()
        self.prompt = prompt
        self.adapter = adapter

    def train(self, mode: bool = True):
        # The PTQ backbone stays in eval mode whatever the trainer asks: it is frozen.
        super().train(mode)
        self.ptq_model.eval()
        self.text_twin.eval()
        return self

    @property
    def classnames(self) -> list[str]:
        return self.prompt.classnames

    def logit_scale_value(self) -> torch.Tensor:
        return self.ptq_model.logit_scale.detach().exp()

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        with torch.no_grad():
            z = self.ptq_model.encode_image(images).float()
        v = self.adapter(z)
        return F.normalize(v, dim=-1) if normalize else v

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Plain texts through the PTQ text tower (the learned prompt is for class_embeddings)."""
        return self.ptq_model.encode_text(tokens, normalize=normalize)

    def class_embeddings(self) -> torch.Tensor:
        """Normalized [num_classes, dim] text features of the learned class prompts."""
        features = encode_text_embeddings(self.text_twin, self.prompt(), self.prompt.token_ids)
        return F.normalize(features.float(), dim=-1)

    def logits(self, images: torch.Tensor | None = None, *, image_features: torch.Tensor | None = None) -> torch.Tensor:
        """Class logits of images, or of the PTQ model's (cached) image features before the adapter."""
        if (images is None) == (image_features is None):
            raise ValueError("pass exactly one of images and image_features")
        if images is not None:
            image = self.encode_image(images, normalize=True)
        else:
            image = F.normalize(self.adapter(image_features.float()), dim=-1)
        return self.logit_scale_value() * image @ self.class_embeddings().t()

    @torch.no_grad()
    def export(self) -> "ExportedP4Q":
        """The inference model: packed adapter, class embeddings through the packed text tower."""
        self.eval()
        features = encode_text_embeddings(self.ptq_model, self.prompt(), self.prompt.token_ids)
        return ExportedP4Q(self.ptq_model, self.adapter.export(), F.normalize(features.float(), dim=-1), self.classnames)


class ExportedP4Q(nn.Module):
    """P4Q for inference: every linear on pyclipq's packed kernels, fixed class embeddings."""

    def __init__(self, ptq_model: nn.Module, adapter: QAdapter, class_embeddings: torch.Tensor, classnames):
        super().__init__()
        self.ptq_model = ptq_model
        self.adapter = adapter
        self.register_buffer("class_embeddings", class_embeddings)
        self.classnames = list(classnames)

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        v = self.adapter(self.ptq_model.encode_image(images).float())
        return F.normalize(v, dim=-1) if normalize else v

    @torch.no_grad()
    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self.ptq_model.encode_text(tokens, normalize=normalize)


class P4QObjective:
    """L = L_c + lambda * tau^2 KL(p_teacher || p_student) over the classes (P4Q eq. 13-15, KL the right way).

    teacher_class_embeddings: the fp32 teacher's normalized [C, D] class embeddings
    (say, its zero-shot classifier); the teacher's image features come from the
    trainer's teacher model. Batches are (images, class labels).
    """

    needs_teacher = True

    def __init__(self, teacher_class_embeddings: torch.Tensor, lam: float = 1.0, temperature: float = 1.0):
        if teacher_class_embeddings.dim() != 2:
            raise ValueError(f"teacher_class_embeddings must be [num_classes, dim], got {list(teacher_class_embeddings.shape)}")
        if lam < 0:
            raise ValueError(f"lam must be >= 0, got {lam!r}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        self.teacher_class_embeddings = F.normalize(teacher_class_embeddings.float(), dim=-1)
        self.lam = float(lam)
        self.temperature = float(temperature)

    def __call__(self, student: P4QModel, teacher: nn.Module, batch):
        """batch: (images, labels), or a FeatureBatches dict of cached image features and labels."""
        cached = isinstance(batch, dict)
        if cached:
            missing = {"image_features", "teacher_image_features", "labels"} - set(batch)
            if missing:
                raise ValueError(f"batch dict is missing {sorted(missing)} (see FeatureBatches)")
            labels = batch["labels"]
        elif isinstance(batch, (list, tuple)) and len(batch) >= 2:
            images, labels = batch[0], batch[1]
        else:
            raise ValueError("batch must be (images, class labels) or a FeatureBatches dict")
        if labels.dtype not in (torch.int32, torch.int64) or labels.dim() != 1:
            raise ValueError(f"batch labels must be a 1-D integer tensor of class ids, got {labels.dtype} {list(labels.shape)}")
        logits = student.logits(image_features=batch["image_features"]) if cached else student.logits(images)
        parts = {"ce": F.cross_entropy(logits, labels)}
        loss = parts["ce"]
        if self.lam > 0:
            with torch.no_grad(), torch.autocast(labels.device.type, enabled=False):
                if cached:
                    t_image = F.normalize(batch["teacher_image_features"].float(), dim=-1)
                else:
                    t_image = F.normalize(teacher.encode_image(images.float()).float(), dim=-1)
                classes = self.teacher_class_embeddings.to(t_image.device)
                t_logits = teacher.logit_scale.exp() * t_image @ classes.t()
            parts["kd"] = kl_teacher_student(logits, t_logits, self.temperature)
            loss = loss + self.lam * parts["kd"]
        return loss, parts


class FeatureBatches:
    """Shuffled batches of cached P4Q inputs: the frozen towers' image features and the labels.

    The PTQ image tower and the teacher are frozen, so without data augmentation their
    image features are the same every epoch: computing them once makes each training
    step cost only the adapter and the text tower. Yields dicts with "image_features"
    (the PTQ model's, before the adapter), "teacher_image_features" and "labels".
    """

    def __init__(self, image_features: torch.Tensor, teacher_image_features: torch.Tensor, labels: torch.Tensor, batch_size: int):
        n = labels.shape[0]
        if image_features.shape[0] != n or teacher_image_features.shape[0] != n:
            raise ValueError(f"image_features, teacher_image_features and labels must have the same length, got "
                             f"{image_features.shape[0]}, {teacher_image_features.shape[0]}, {n}")
        if not 1 <= batch_size <= n:
            raise ValueError(f"batch_size must be in [1, {n}], got {batch_size}")
        self.image_features, self.teacher_image_features, self.labels = image_features, teacher_image_features, labels
        self.batch_size = batch_size

    def __len__(self) -> int:
        return self.labels.shape[0] // self.batch_size

    def __iter__(self):
        order = torch.randperm(self.labels.shape[0])  # the trainer seeds each epoch: resumable
        for b in range(len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            yield {
                "image_features": self.image_features[idx],
                "teacher_image_features": self.teacher_image_features[idx],
                "labels": self.labels[idx],
            }

    @classmethod
    @torch.no_grad()
    def from_batches(cls, ptq_model: nn.Module, teacher: nn.Module, batches, device="cpu") -> "FeatureBatches":
        """Encode one pass over (images, labels) batches with both frozen image towers."""
        ptq_model = ptq_model.to(device).eval()
        teacher = teacher.to(device).eval()
        features, teacher_features, labels, batch_size = [], [], [], None
        for batch in batches:
            if not isinstance(batch, (list, tuple)) or len(batch) < 2:
                raise ValueError("batches must yield (images, class labels)")
            images = batch[0].to(device)
            batch_size = batch_size or images.shape[0]
            features.append(ptq_model.encode_image(images).float().cpu())
            teacher_features.append(teacher.encode_image(images.float()).float().cpu())
            labels.append(torch.as_tensor(batch[1]).cpu())
        if batch_size is None:
            raise ValueError("batches yielded nothing")
        return cls(torch.cat(features), torch.cat(teacher_features), torch.cat(labels), batch_size)


def p4q_optimizers(model: P4QModel, prompt_lr: float = 2e-3, adapter_lr: float = 1e-3, momentum: float = 0.9, weight_decay: float = 0.0):
    """P4Q's split: SGD for the prompt's context vectors, AdamW for the adapter."""
    prompt = torch.optim.SGD(model.prompt.parameters(), lr=prompt_lr, momentum=momentum, weight_decay=0.0)
    adapter = torch.optim.AdamW(model.adapter.parameters(), lr=adapter_lr, weight_decay=weight_decay)
    return [prompt, adapter]
