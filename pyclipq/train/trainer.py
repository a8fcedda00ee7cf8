"""A small distillation trainer: frozen fp32 teacher, AdamW + warm-up/cosine, checkpoints that resume exactly.

It trains any student on any re-iterable source of batches (a DataLoader, a list, or
pyclipq.train.recipes.TestbedPairs); what a step computes is an *objective*:
``objective(student, teacher, batch) -> (loss, {name: part})``. The default,
`CLIPDistillation`, takes (images, token ids[, positives]) batches of a CLIP-like
model (encode_image / encode_text / logit_scale) and applies a DistillationLoss.

Resuming reproduces the uninterrupted run: a checkpoint holds the student, every
optimizer and scheduler, the step, the position in the data (epoch, batch), and the
RNG state. Each epoch's iterator is created under a fixed seed (seed, epoch), so a
shuffling DataLoader yields the same order again, and on resume the batches already
consumed in the current epoch are skipped before the RNG state is restored.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..eval.encode import as_clip_like
from ..models.base import AttentionProjections, attention_projections, repeated_blocks
from . import qat
from .distill import DistillationLoss, EncoderDistillationLoss
from .qat import deepcopy_model

PRECISIONS = ("fp32", "bf16")
CHECKPOINT_FILE = "checkpoint.pt"
LOG_FILE = "train_log.jsonl"
CHECKPOINT_VERSION = 1


@dataclass
class TrainConfig:
    steps: int = 1000
    lr: float = 1e-4
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # the cosine ends at lr * min_lr_ratio
    grad_clip: float | None = 1.0  # max global grad norm; None = no clipping
    precision: str = "fp32"
    device: str = "cpu"
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 0  # 0: only when fit() returns
    output_dir: str | None = None  # checkpoint + JSONL log; None: neither is written
    progress: bool = True
    max_logit_scale: float | None = math.log(100)  # CLIP's clamp on a trained logit_scale

    def __post_init__(self):
        for name in ("steps",):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an int >= 1, got {getattr(self, name)!r}")
        for name in ("warmup_steps", "log_every", "checkpoint_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be an int >= 0, got {getattr(self, name)!r}")
        if self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must not exceed steps ({self.steps})")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0 or None, got {self.grad_clip!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {self.precision!r}")
        self.betas = tuple(self.betas)


def lr_factor(step: int, total: int, warmup: int, min_ratio: float = 0.0) -> float:
    """Linear warm-up over `warmup` steps, then cosine from 1 to min_ratio at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def clip_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups as in CLIP: no decay on gains, biases, embeddings and the temperature."""
    decayed, exempt = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or "embedding" in name or "logit_scale" in name:
            exempt.append(p)
        else:
            decayed.append(p)
    if not decayed and not exempt:
        raise ValueError("model has no trainable parameters (requires_grad=True)")
    return [g for g in ({"params": decayed, "weight_decay": weight_decay}, {"params": exempt, "weight_decay": 0.0}) if g["params"]]


def to_device(batch, device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


def unpack_clip_batch(batch):
    """(images, token ids[, positives]) or {"images", "tokens"[, "positives"]} -> the three (positives may be None)."""
    if isinstance(batch, dict):
        missing = {"images", "tokens"} - set(batch)
        if missing:
            raise ValueError(f"batch dict must have keys 'images' and 'tokens' (optional 'positives'), missing {sorted(missing)}")
        images, tokens, positives = batch["images"], batch["tokens"], batch.get("positives")
    elif isinstance(batch, (list, tuple)) and len(batch) in (2, 3):
        images, tokens = batch[0], batch[1]
        positives = batch[2] if len(batch) == 3 else None
    else:
        raise ValueError("batch must be (images, token ids), (images, token ids, positives) or a dict with those keys, "
                         f"got {type(batch).__name__}")
    if not isinstance(images, torch.Tensor) or not isinstance(tokens, torch.Tensor):
        raise ValueError(f"batch images and token ids must be tensors, got {type(images).__name__} and {type(tokens).__name__}")
    if tokens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"batch token ids must be an integer tensor, got {tokens.dtype}")
    if images.shape[0] != tokens.shape[0]:
        raise ValueError(f"batch has {images.shape[0]} images but {tokens.shape[0]} token rows")
    return images, tokens, positives


def clip_outputs(model, images: torch.Tensor, tokens: torch.Tensor) -> dict:
    """{"image_features", "text_features", "logit_scale"} of a CLIP-like model (unnormalized features)."""
    scale = getattr(model, "logit_scale", None)
    if scale is None:
        raise ValueError(f"model must have a logit_scale (a CLIP-like model), {type(model).__name__} has none")
    model = as_clip_like(model)  # a transformers CLIPModel gets encode_image / encode_text
    return {
        "image_features": model.encode_image(images),
        "text_features": model.encode_text(tokens),
        "logit_scale": scale.exp() if isinstance(scale, torch.Tensor) else math.exp(scale),
    }


class CLIPDistillation:
    """The default objective: DistillationLoss between a CLIP student and its frozen teacher.

    gather: None (one process), or an object with ``rows(features)`` and
    ``positives(matrix)`` that assemble the global batch of every rank
    (pyclipq.train.distributed.GlobalBatch), so the loss sees every rank's pairs as negatives.
    """

    def __init__(self, loss: DistillationLoss | None = None, gather=None):
        self.loss = loss if loss is not None else DistillationLoss()
        if not isinstance(self.loss, DistillationLoss):
            raise ValueError(f"loss must be a DistillationLoss, got {type(self.loss).__name__}")
        self.gather = gather

    @property
    def needs_teacher(self) -> bool:
        return self.loss.needs_teacher

    def __call__(self, student, teacher, batch):
        images, tokens, positives = unpack_clip_batch(batch)
        outputs = clip_outputs(student, images, tokens)
        teacher_outputs = None
        if self.loss.needs_teacher:
            with torch.no_grad(), torch.autocast(images.device.type, enabled=False):
                teacher_outputs = clip_outputs(teacher, images.float(), tokens)
        if self.gather is not None:
            outputs, teacher_outputs = self._global(outputs), self._global(teacher_outputs)
            positives = self.gather.positives(positives) if positives is not None else None
        return self.loss(outputs, teacher_outputs, positives)

    def _global(self, outputs: dict | None) -> dict | None:
        if outputs is None:
            return None
        return {**outputs, "image_features": self.gather.rows(outputs["image_features"]),
                "text_features": self.gather.rows(outputs["text_features"])}


TOWERS = {"images": ("image", "encode_image"), "tokens": ("text", "encode_text")}


def _first_tensor(output) -> torch.Tensor:
    # transformers' layers return tuples (hidden state first) or model outputs; open_clip's, tensors
    if isinstance(output, torch.Tensor):
        return output
    values = output.values() if isinstance(output, dict) else output
    return next(v for v in values if isinstance(v, torch.Tensor))


def encoder_outputs(model: nn.Module, batch: dict, blocks: list[str] | None,
                    attention: list[AttentionProjections] | None = None) -> dict:
    """{tower: {"embedding", "hidden"[, "attention"][, "mask"]}} for every tower `batch` feeds ("images",
    "tokens"): the model's own embedding (encode_image / encode_text), when `blocks` is given the
    output of each named block that ran, in order, when `attention` is given each of those blocks'
    attention scores (Q K^T * scale, [B, heads, T, T], before any mask and softmax), and for a text
    tower that tells its padding (`padding_mask(tokens)`, a SentenceEncoder) the bool [B, T] mask of
    its real tokens."""
    clip_like = as_clip_like(model)
    captured: list[torch.Tensor] = []
    projected: dict[str, torch.Tensor] = {}

    def keep(name):
        return lambda m, a, out: projected.__setitem__(name, _first_tensor(out))

    hooks = [model.get_submodule(name).register_forward_hook(lambda m, a, out: captured.append(_first_tensor(out)))
             for name in (blocks or [])]
    for source in attention or []:
        hooks += [model.get_submodule(name).register_forward_hook(keep(name)) for name in (source.query, source.key)]
    try:
        outputs = {}
        for key, (tower, encode) in TOWERS.items():
            if key in batch:
                captured.clear()
                projected.clear()
                embedding = getattr(clip_like, encode)(batch[key])
                outputs[tower] = {"embedding": embedding, "hidden": list(captured)}
                if attention:
                    outputs[tower]["attention"] = [_attention_scores(projected, source) for source in attention
                                                   if source.query in projected]
                padding_mask = getattr(clip_like, "padding_mask", None)
                if key == "tokens" and callable(padding_mask):
                    outputs[tower]["mask"] = padding_mask(batch[key])
    finally:
        for hook in hooks:
            hook.remove()
    return outputs


def _attention_scores(projected: dict, source: AttentionProjections) -> torch.Tensor:
    q, k = projected[source.query], projected[source.key]
    batch, tokens = q.shape[0], q.shape[-2]
    q = q.reshape(batch, tokens, source.heads, source.head_dim).transpose(1, 2)
    k = k.reshape(batch, tokens, source.heads, source.head_dim).transpose(1, 2)
    return (q.float() @ k.float().transpose(-1, -2)) * source.scale


class EncoderDistillation:
    """Label-free distillation: the student matches the frozen teacher's output embeddings and the
    output of every transformer block (EncoderDistillationLoss), on unlabelled batches
    {"images"}, {"tokens"} or both (pyclipq.data.unlabelled_batches). Works for any model
    with encode_image / encode_text (a CLIP of any family, or a text encoder wrapped in
    pyclipq.eval.encode.SentenceEncoder); the blocks are found by `repeated_blocks` on the teacher.

    dropout: False (default) runs the student in eval mode, as the teacher runs: matching a
    deterministic teacher through dropout noise only blurs the target (measured on MiniLM:
    ternary 0.77 cosine at 600 steps with BERT's dropout on). Fake-quant is the same in both modes.
    """

    needs_teacher = True

    def __init__(self, loss: EncoderDistillationLoss | None = None, dropout: bool = False):
        self.loss = loss if loss is not None else EncoderDistillationLoss()
        self.dropout = dropout
        if not isinstance(self.loss, EncoderDistillationLoss):
            raise ValueError(f"loss must be an EncoderDistillationLoss, got {type(self.loss).__name__}")
        self._blocks: list[str] | None = None
        self._attention: list[AttentionProjections] | None = None

    def blocks(self, teacher: nn.Module) -> list[str]:
        if self._blocks is None:
            self._blocks = repeated_blocks(teacher)
            if not self._blocks and (self.loss.hidden_weight > 0 or self.loss.attention_weight > 0):
                raise ValueError(f"{type(teacher).__name__} has no repeated transformer blocks whose hidden states "
                                 "or attention maps could be matched; set hidden_weight=0 and attention_weight=0")
        return self._blocks

    def attention(self, teacher: nn.Module) -> list[AttentionProjections]:
        """The query / key projections of the teacher's blocks (the student's have the same names)."""
        if self._attention is None:
            self._attention = attention_projections(teacher, self.blocks(teacher))
        return self._attention

    def __call__(self, student, teacher, batch):
        if not isinstance(batch, dict) or not set(TOWERS) & set(batch):
            raise ValueError(f"batch must be a dict with 'images' and/or 'tokens', got {type(batch).__name__}"
                             + (f" with keys {sorted(batch)}" if isinstance(batch, dict) else ""))
        blocks = self.blocks(teacher) if self.loss.hidden_weight > 0 else None
        attention = self.attention(teacher) if self.loss.attention_weight > 0 else None
        if not self.dropout:
            student.eval()  # the trainer put it in train mode for this step
        outputs = encoder_outputs(student, batch, blocks, attention)
        with torch.no_grad(), torch.autocast(next(iter(batch.values())).device.type, enabled=False):
            teacher_batch = {k: (v.float() if k == "images" else v) for k, v in batch.items() if k in TOWERS}
            teacher_outputs = encoder_outputs(teacher, teacher_batch, blocks, attention)
        return self.loss(outputs, teacher_outputs)


def default_teacher(student: nn.Module) -> nn.Module:
    """The original float model of a QAT student (its latent weights, as they are now)."""
    if not qat.is_prepared(student):
        raise ValueError(
            "teacher: no teacher given and the student is not a QAT-prepared model, so there is no original "
            "model to distill from; pass teacher=<the fp32 model> (or use an objective that needs none)"
        )
    return qat.strip(student)


def frozen_teacher(teacher: nn.Module, device) -> nn.Module:
    """`teacher` frozen in float32 on `device`, copied first when freezing would change the caller's model.

    The teacher is often the very model a student was prepared from; setting
    requires_grad or the dtype in place would leak into the caller's later use of it.
    """
    tensors = list(teacher.parameters()) + list(teacher.buffers())
    if any(p.requires_grad for p in teacher.parameters()) or any(t.is_floating_point() and t.dtype != torch.float32 for t in tensors):
        teacher = deepcopy_model(teacher)
    return teacher.to(device).float().eval().requires_grad_(False)


@dataclass
class _Position:
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0


def _batches_per_epoch(data) -> float:
    """len(data) when the data knows it (a DataLoader over a map-style dataset, a list), else infinity."""
    try:
        return len(data)
    except TypeError:
        return math.inf


class Trainer:
    """Trains `student` on `data` with `objective`; see the module doc.

    teacher: an nn.Module, frozen here (eval, no grad, float32); "auto" (default) =
    the original model of a QAT-prepared student when the objective needs a teacher;
    None = no teacher. optimizers: None = AdamW over the student's trainable
    parameters (CLIP's weight-decay groups); or a list of optimizers, each given the
    same warm-up + cosine schedule relative to its own learning rates.
    """

    def __init__(
        self,
        student: nn.Module,
        data,
        config: TrainConfig,
        *,
        teacher: nn.Module | str | None = "auto",
        objective: Callable | None = None,
        optimizers: list[torch.optim.Optimizer] | None = None,
    ):
        if not isinstance(student, nn.Module):
            raise ValueError(f"student must be a torch.nn.Module, got {type(student).__name__}")
        if not isinstance(config, TrainConfig):
            raise ValueError(f"config must be a TrainConfig, got {type(config).__name__}")
        if iter(data) is data:
            raise ValueError("data must be re-iterable (a DataLoader, a list, a dataset-like object), not a one-shot iterator: "
                             "each epoch and each resume iterates it afresh")
        self.config = config
        self.device = torch.device(config.device)
        self.student = student.to(self.device)
        self.data = data
        self.objective = objective if objective is not None else CLIPDistillation()
        needs_teacher = getattr(self.objective, "needs_teacher", True)
        if isinstance(teacher, str):
            if teacher != "auto":
                raise ValueError(f"teacher must be an nn.Module, 'auto' or None, got {teacher!r}")
            teacher = default_teacher(student) if needs_teacher else None
        if teacher is not None:
            if not isinstance(teacher, nn.Module):
                raise ValueError(f"teacher must be an nn.Module, 'auto' or None, got {type(teacher).__name__}")
            teacher = frozen_teacher(teacher, self.device)
        elif needs_teacher:
            raise ValueError("teacher: the objective needs a teacher (kd_weight or feature_weight > 0) but teacher=None")
        self.teacher = teacher
        if optimizers is None:
            optimizers = [torch.optim.AdamW(clip_param_groups(student, config.weight_decay), lr=config.lr, betas=config.betas, eps=config.eps)]
        if not optimizers or not all(isinstance(o, torch.optim.Optimizer) for o in optimizers):
            raise ValueError("optimizers must be a non-empty list of torch.optim.Optimizer")
        self.optimizers = list(optimizers)
        self.schedulers = [
            torch.optim.lr_scheduler.LambdaLR(o, lambda s: lr_factor(s, config.steps, config.warmup_steps, config.min_lr_ratio))
            for o in self.optimizers
        ]
        self.params = [p for o in self.optimizers for g in o.param_groups for p in g["params"]]
        self.position = _Position()
        self.history: list[dict] = []  # one record per step: step, loss, parts, lr, grad_norm
        self.skipped = 0  # bad images the data left out, on this process
        self.output_dir = Path(config.output_dir) if config.output_dir else None

    # ------------------------------------------------------------ checkpoints

    def checkpoint_path(self) -> Path | None:
        return self.output_dir / CHECKPOINT_FILE if self.output_dir else None

    def state_dict(self) -> dict:
        return {
            "version": CHECKPOINT_VERSION,
            "position": asdict(self.position),
            "student": self.student.state_dict(),
            "optimizers": [o.state_dict() for o in self.optimizers],
            "schedulers": [s.state_dict() for s in self.schedulers],
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self.config).items()},
        }

    def save_checkpoint(self, path: str | os.PathLike | None = None) -> Path:
        return self.write_checkpoint(self.state_dict(), path)

    def write_checkpoint(self, state: dict, path: str | os.PathLike | None = None) -> Path:
        path = Path(path) if path is not None else self.checkpoint_path()
        if path is None:
            raise ValueError("path: no checkpoint path given and config.output_dir is not set")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)  # atomic: an interrupted save never leaves a half-written checkpoint
        return path

    def load_checkpoint(self, path: str | os.PathLike | None = None) -> None:
        """Restore a checkpoint written by save_checkpoint; the next fit() continues where it stopped."""
        self.load_state_dict(self.read_checkpoint(path))

    def read_checkpoint(self, path: str | os.PathLike | None = None) -> dict:
        path = Path(path) if path is not None else self.checkpoint_path()
        if path is None or not path.is_file():
            raise FileNotFoundError(f"path: no checkpoint at {path}")
        # weights_only: a checkpoint is data (tensors, numbers, lists); nothing is unpickled.
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
            raise ValueError(f"path: {path} is not a pyclipq trainer checkpoint (version {CHECKPOINT_VERSION})")
        if len(state["optimizers"]) != len(self.optimizers):
            raise ValueError(f"path: the checkpoint has {len(state['optimizers'])} optimizers, this trainer {len(self.optimizers)}")
        return state

    def load_state_dict(self, state: dict) -> None:
        self.student.load_state_dict(state["student"])
        for o, s in zip(self.optimizers, state["optimizers"]):
            o.load_state_dict(s)
        for sch, s in zip(self.schedulers, state["schedulers"]):
            sch.load_state_dict(s)
        self.position = _Position(**state["position"])
        self._resume_rng = (state["rng"], state["cuda_rng"])

    # ------------------------------------------------------------ data

    def _epoch_iterator(self, epoch: int, skip: int):
        sampler = getattr(self.data, "sampler", None)
        if hasattr(sampler, "set_epoch"):  # a DistributedSampler reshuffles by epoch, not by the global RNG
            sampler.set_epoch(epoch)
        # A fixed seed per epoch makes a shuffling loader repeat its order on resume;
        # fork_rng keeps that seeding from touching the training RNG stream.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed * 1_000_003 + epoch)
            iterator = iter(self.data)
            first = next(iterator, None)
        if first is None:
            raise ValueError("data yielded no batch in an epoch")

        def chained():
            yield first
            yield from iterator

        batches = chained()
        for _ in range(skip):
            if next(batches, None) is None:
                raise ValueError(f"data has fewer than {skip} batches per epoch, but the checkpoint is {skip} batches in")
        return batches

    def _batches(self):
        # Skipping consumed batches may draw from the global RNG (a dataset's own
        # randomness): the RNG state is put back afterwards, to the checkpoint's on resume.
        rng = getattr(self, "_resume_rng", None)
        self._resume_rng = None
        if rng is None:
            rng = (torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])
        if self.position.batch_in_epoch and self.position.batch_in_epoch >= _batches_per_epoch(self.data):
            # a checkpoint taken at the last batch of an epoch: the next batch is the next epoch's first
            self.position.epoch += 1
            self.position.batch_in_epoch = 0
        batches = self._epoch_iterator(self.position.epoch, self.position.batch_in_epoch)
        torch.set_rng_state(rng[0])
        if rng[1] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng[1])
        while True:
            yield from batches
            self.position.epoch += 1
            self.position.batch_in_epoch = 0
            batches = self._epoch_iterator(self.position.epoch, 0)

    # ------------------------------------------------------------ training

    def _log(self, record: dict) -> None:
        if self.output_dir is None:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        with open(self.output_dir / LOG_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")

    def compute_loss(self, batch):
        """(loss, parts) of one batch; the distributed trainer runs it inside DistributedDataParallel."""
        return self.objective(self.student, self.teacher, batch)

    def train_step(self, batch) -> dict:
        batch = to_device(batch, self.device)
        self.student.train()
        use_bf16 = self.config.precision == "bf16"
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=use_bf16):
            loss, parts = self.compute_loss(batch)
        if not bool(torch.isfinite(loss)):
            raise FloatingPointError(f"loss is {loss.item()} at step {self.position.step + 1}; lower lr or check the data")
        for o in self.optimizers:
            o.zero_grad(set_to_none=True)
        loss.backward()
        grads = [p for p in self.params if p.grad is not None]
        if self.config.grad_clip is not None and grads:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(grads, self.config.grad_clip))
        else:
            grad_norm = float(torch.linalg.vector_norm(torch.stack([g.grad.norm() for g in grads]))) if grads else 0.0
        lr = self.optimizers[0].param_groups[0]["lr"]
        for o in self.optimizers:
            o.step()
        for s in self.schedulers:
            s.step()
        scale = getattr(self.student, "logit_scale", None)
        if self.config.max_logit_scale is not None and isinstance(scale, nn.Parameter) and scale.requires_grad:
            with torch.no_grad():
                scale.clamp_(0, self.config.max_logit_scale)
        self.position.step += 1
        self.position.batch_in_epoch += 1
        record = {
            "step": self.position.step,
            "loss": float(loss.detach()),
            **{k: float(v.detach()) for k, v in parts.items()},
            "lr": lr,
            "grad_norm": grad_norm,
        }
        if isinstance(batch, dict) and "skipped" in batch:  # bad images left out (pyclipq.data)
            self.skipped += int(batch["skipped"])
            record["skipped"] = self.skipped
        return record

    def fit(self, until: int | None = None) -> list[dict]:
        """Train up to step `until` (default config.steps); checkpoint at the end. Returns the step records."""
        until = self.config.steps if until is None else until
        if not isinstance(until, int) or not 0 <= until <= self.config.steps:
            raise ValueError(f"until must be an int in [0, {self.config.steps}], got {until!r}")
        if self.position.step >= until:
            return self.history
        started = time.perf_counter()
        bar = tqdm(total=until, initial=self.position.step, desc="train", disable=not self.config.progress, dynamic_ncols=True)
        batches = self._batches()
        try:
            while self.position.step < until:
                record = self.train_step(next(batches))
                record["seconds"] = round(time.perf_counter() - started, 3)
                self.history.append(record)
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
                step = self.position.step
                if self.config.log_every and (step % self.config.log_every == 0 or step == until):
                    self._log(record)
                if self.output_dir and self.config.checkpoint_every and step % self.config.checkpoint_every == 0:
                    self.save_checkpoint()
        finally:
            bar.close()
            batches.close()
        if self.output_dir:
            self.save_checkpoint()
        return self.history
