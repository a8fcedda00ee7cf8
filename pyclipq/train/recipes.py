"""One-call recipes (TernaryCLIP QAT + self-distillation, P4Q) and their command line on the test bed.

    python -m pyclipq.train.recipes ternary --preset qall --out runs/ternary
    python -m pyclipq.train.recipes p4q --format int4 --out runs/p4q

Each command loads the shipped test-bed CLIP (pyclipq.testbed), measures fp32 and PTQ
zero-shot top-1 on the test split, trains, converts to the packed kernels, measures
again on those kernels, saves the model with pyclipq.save, and writes results.json.
``ternary_main(argv)`` / ``p4q_main(argv)`` / ``main(argv)`` are the entry points a
CLI can call. The Python functions ``ternary_clip`` and ``p4q`` work on any open_clip
model and any data.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import itertools
import json
import math
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .. import formats
from .. import io as pyclipq_io
from ..calibrate import calibrate
from ..configs import LayerConfig, QuantConfig
from ..convert import convert as pyclipq_convert
from ..eval.zero_shot import zero_shot_accuracy, zero_shot_classifier
from ..nn import QuantLinear
from ..testbed import load_testbed, make_split
from ..testbed.scenes import SceneAttributes
from ..testbed.splits import TestbedSplit
from ..testbed.train import describes
from .distill import DistillationLoss
from .distributed import DistributedContext, DistributedTrainer
from .p4q import ExportedP4Q, FeatureBatches, P4QModel, P4QObjective, QAdapter, p4q_optimizers
from .prompt import PromptLearner
from .qat import convert_qat, deepcopy_model, prepare_qat
from .trainer import CLIPDistillation, TrainConfig, Trainer

TERNARY_PRESETS = {"qall": "ternary-qall", "qffn": "ternary-qffn"}


# ---------------------------------------------------------------- TernaryCLIP


def _trainer(student, data, train: TrainConfig, distributed: DistributedContext | None, **kwargs) -> Trainer:
    if distributed is None:
        return Trainer(student, data, train, **kwargs)
    return DistributedTrainer(student, data, train, context=distributed, **kwargs)


@dataclass
class TernaryResult:
    student: nn.Module  # the fake-quant model (latent float weights)
    quantized: nn.Module  # the packed model: QuantLinear / QuantMultiheadAttention / packed parameters
    history: list[dict]
    trainer: Trainer


def ternary_config(preset: str = "qall", threshold_rule: str = "absmean") -> QuantConfig:
    """TernaryCLIP's Q-ALL (every linear, attention and projections) or Q-FFN (MLPs only)."""
    if preset not in TERNARY_PRESETS:
        raise ValueError(f"preset must be one of {sorted(TERNARY_PRESETS)}, got {preset!r}")
    return QuantConfig.preset(TERNARY_PRESETS[preset], threshold_rule=threshold_rule)


def ternary_clip(
    model: nn.Module,
    data,
    *,
    preset: str = "qall",
    threshold_rule: str = "absmean",
    train: TrainConfig | None = None,
    loss: DistillationLoss | None = None,
    teacher: nn.Module | None = None,
    exact: bool = True,
    resume: bool = False,
    distributed: DistributedContext | None = None,
) -> TernaryResult:
    """Ternary QAT with self-distillation, in one call.

    model: a float CLIP (left untouched; the default teacher is a frozen fp32 copy of it).
    data: re-iterable (images, token ids[, positives]) batches.
    resume: continue from train.output_dir's checkpoint when there is one.
    distributed: this process's rank (pyclipq.train.distributed.init_distributed()); `data`
    then holds this rank's batches and the loss sees the global batch.
    """
    train = train if train is not None else TrainConfig()
    loss = loss if loss is not None else DistillationLoss(contrastive_weight=1.0, kd_weight=1.0, feature_weight=1.0)
    teacher = teacher if teacher is not None else deepcopy_model(model)
    student = prepare_qat(model, ternary_config(preset, threshold_rule), exact=exact)
    trainer = _trainer(student, data, train, distributed, teacher=teacher, objective=CLIPDistillation(loss))
    checkpoint = trainer.checkpoint_path()
    if resume and checkpoint is not None and checkpoint.is_file():
        trainer.load_checkpoint()
    history = trainer.fit()
    # Packing runs on the CPU, which every pyclipq build has kernels for; move the result after.
    quantized = convert_qat(student.cpu()).eval()
    return TernaryResult(student.eval(), quantized, history, trainer)


# ---------------------------------------------------------------- P4Q


@dataclass
class P4QResult:
    model: P4QModel  # training form (fake-quant adapter, differentiable text twin)
    exported: ExportedP4Q  # packed adapter + class embeddings from the packed text tower
    history: list[dict]
    trainer: Trainer


def p4q(
    ptq_model: nn.Module,
    teacher: nn.Module,
    tokenizer,
    classnames,
    data,
    *,
    templates=("a photo of a {}.",),
    n_ctx: int = 16,
    position: str = "end",
    ctx_init: str | None = None,
    alpha: float = 0.2,
    reduction: int = 4,
    adapter_layer: LayerConfig | str = "int8",
    lam: float = 1.0,
    temperature: float = 1.0,
    prompt_lr: float = 2e-3,
    adapter_lr: float = 1e-3,
    train: TrainConfig | None = None,
    resume: bool = False,
    cache_features: bool = True,
    distributed: DistributedContext | None = None,
) -> P4QResult:
    """P4Q on a frozen PTQ model, in one call.

    ptq_model: a converted (packed) open_clip CLIP; teacher: its fp32 original.
    data: re-iterable (images, class labels) batches. The teacher's class embeddings
    come from `templates` (a zero-shot classifier). Only the prompt (SGD) and the
    adapter (AdamW) train, both on the warm-up + cosine schedule of `train`.
    cache_features: encode the images with both frozen towers once (FeatureBatches);
    turn it off when `data` augments its images, which caching would freeze.
    distributed: as in ternary_clip; each rank caches and trains on its own slice of the data.
    """
    train = train if train is not None else TrainConfig()
    device = torch.device(train.device)
    teacher = teacher.to(device).float().eval()
    ptq_model = ptq_model.to(device).eval()
    teacher_classes = zero_shot_classifier(teacher, tokenizer, classnames, templates, device=device, progress=False)
    prompt = PromptLearner(ptq_model, tokenizer, classnames, n_ctx=n_ctx, position=position, ctx_init=ctx_init)
    width = teacher_classes.shape[1]
    adapter = QAdapter(width, reduction=reduction, alpha=alpha, layer=adapter_layer)
    model = P4QModel(ptq_model, prompt, adapter)
    if cache_features:
        data = FeatureBatches.from_batches(ptq_model, teacher, data, device)
    optimizers = p4q_optimizers(model, prompt_lr=prompt_lr, adapter_lr=adapter_lr)
    trainer = _trainer(model, data, train, distributed, teacher=teacher, objective=P4QObjective(teacher_classes, lam, temperature),
                       optimizers=optimizers)
    checkpoint = trainer.checkpoint_path()
    if resume and checkpoint is not None and checkpoint.is_file():
        trainer.load_checkpoint()
    history = trainer.fit()
    return P4QResult(model.eval(), model.export(), history, trainer)


# ---------------------------------------------------------------- test-bed data


class TestbedPairs:
    """Re-iterable, shuffled (images, token ids, positives) batches over the first n train scenes.

    positives marks every caption that truly describes an image (pyclipq.testbed.train.describes):
    test-bed captions often leave out size and position, so one caption fits several scenes.
    """

    __test__ = False  # not a pytest class

    def __init__(self, n: int, batch_size: int, tokenizer, split: str = "train", labels: bool = False):
        if batch_size < 2 or batch_size > n:
            raise ValueError(f"batch_size must be in [2, n={n}], got {batch_size}")
        self.data = make_split(split, n)
        self.tokens = tokenizer(self.data.captions)
        self.batch_size = batch_size
        self.labels = labels

    def __len__(self) -> int:
        return len(self.data) // self.batch_size

    def with_labels(self) -> "TestbedPairs":
        """The same scenes as (images, class labels) batches (P4Q's data), without rendering again."""
        view = copy.copy(self)
        view.labels = True
        return view

    def __iter__(self):
        order = torch.randperm(len(self.data))  # the trainer seeds each epoch: resumable
        d = self.data
        for b in range(len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            if self.labels:
                yield d.images[idx], d.labels[idx]
                continue
            part = TestbedSplit(
                images=d.images[idx], labels=d.labels[idx], captions=[d.captions[i] for i in idx.tolist()],
                mentions_size=d.mentions_size[idx], mentions_position=d.mentions_position[idx],
                attributes=SceneAttributes(**{k: v[idx] for k, v in vars(d.attributes).items()}),
            )
            yield d.images[idx], self.tokens[idx], describes(part)


@torch.no_grad()
def zero_shot_top1(model, tokenizer, classnames, templates, loader, device="cpu") -> float:
    classifier = zero_shot_classifier(model, tokenizer, classnames, templates, device=device, progress=False)
    return zero_shot_accuracy(model, classifier, loader, device=device, progress=False)["top1"]


@torch.no_grad()
def p4q_top1(exported: ExportedP4Q, loader, device="cpu") -> float:
    return zero_shot_accuracy(exported, exported.class_embeddings, loader, device=device, progress=False)["top1"]


# ---------------------------------------------------------------- command line


def _common_arguments(parser: argparse.ArgumentParser, steps: int, lr: float, batch: int) -> None:
    training_arguments(parser, steps, lr, batch)
    parser.add_argument("--train-scenes", type=int, default=8192, help="test-bed train scenes to cycle over")
    parser.add_argument("--eval-scenes", type=int, default=4096, help="test-split scenes for zero-shot top-1")
    parser.add_argument("--eval-device", default="cpu", help="device of the zero-shot evaluations (the packed model runs there)")
    parser.add_argument("--testbed", type=Path, default=None, help="test-bed weights folder (default: the shipped weights)")
    parser.add_argument("--device", default="cpu", help="training device")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")


def training_arguments(parser: argparse.ArgumentParser, steps: int, lr: float, batch: int) -> None:
    """The options of every training run (the test bed's and the user's own data)."""
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--batch-size", type=int, default=batch, help="the global batch (all processes together)")
    parser.add_argument("--lr", type=float, default=lr)
    parser.add_argument("--warmup-steps", type=int, default=None, help="default: 5%% of --steps")
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--grad-clip", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (1 is fastest for the tiny test bed on a busy machine)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="folder for the checkpoint, log, results.json and the packed model")
    parser.add_argument("--resume", action="store_true", help="continue from --out's checkpoint")
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--no-progress", action="store_true")


def train_config(args) -> TrainConfig:
    warmup = args.warmup_steps if args.warmup_steps is not None else max(1, args.steps // 20)
    return TrainConfig(
        steps=args.steps, lr=args.lr, weight_decay=args.weight_decay, warmup_steps=warmup, grad_clip=args.grad_clip or None,
        precision=args.precision, device=args.device, seed=args.seed, log_every=args.log_every,
        checkpoint_every=args.checkpoint_every, output_dir=str(args.out), progress=not args.no_progress,
    )


def _setup(args):
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    testbed = load_testbed(args.testbed)
    test = make_split("test", args.eval_scenes).loader(512)
    return testbed, test


def _write_results(args, command: str, argv, results: dict) -> dict:
    results["command"] = f"pyclipq train {command} " + shlex.join(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: v for k, v in results.items() if k != "history"}, indent=2), flush=True)
    return results


def ternary_main(argv: list[str] | None = None, prog: str = "pyclipq train ternary") -> dict:
    """`ternary` command: TernaryCLIP QAT + KD on the test bed."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog=prog, description=ternary_main.__doc__)
    ternary_arguments(parser)
    _common_arguments(parser, steps=600, lr=5e-4, batch=128)
    args = parser.parse_args(argv)
    train = train_config(args)
    testbed, test = _setup(args)
    tok, names, templates = testbed.tokenizer, testbed.classnames, testbed.templates
    config = ternary_config(args.preset, args.threshold_rule)
    started = time.perf_counter()
    fp32 = zero_shot_top1(testbed.model, tok, names, templates, test, args.eval_device)
    ptq = zero_shot_top1(pyclipq_convert(deepcopy_model(testbed.model), config), tok, names, templates, test, args.eval_device)
    print(f"fp32 top-1 {fp32:.4f}   ternary-{args.preset} PTQ top-1 {ptq:.4f}", flush=True)
    data = TestbedPairs(args.train_scenes, args.batch_size, tok)
    result = ternary_clip(
        testbed.model, data, preset=args.preset, threshold_rule=args.threshold_rule, train=train, loss=distillation_loss(args),
        exact=not args.fast_fake_quant, resume=args.resume,
    )
    after = zero_shot_top1(result.quantized, tok, names, templates, test, args.eval_device)  # on the packed kernels
    model_path = args.out / "model.safetensors"
    pyclipq_io.save(result.quantized, model_path)
    return _write_results(args, "ternary", argv, {
        "recipe": f"ternary-{args.preset}", "threshold_rule": args.threshold_rule, "eval_scenes": args.eval_scenes,
        "fp32_top1": fp32, "ptq_top1": ptq, "after_top1": after, "gap_to_fp32": fp32 - after,
        "loss_first": result.history[0]["loss"] if result.history else None,
        "loss_last": result.history[-1]["loss"] if result.history else None,
        "seconds": round(time.perf_counter() - started, 1), "model": str(model_path),
        "train": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(train).items()},
    })


def ternary_arguments(parser: argparse.ArgumentParser) -> None:
    """TernaryCLIP's options: the preset, the threshold rule and the distillation loss."""
    parser.add_argument("--preset", choices=sorted(TERNARY_PRESETS), default="qall")
    parser.add_argument("--threshold-rule", choices=("absmean", "twice_mean"), default="absmean")
    parser.add_argument("--contrastive-weight", type=float, default=1.0)
    parser.add_argument("--kd-weight", type=float, default=1.0)
    parser.add_argument("--kd-temperature", type=float, default=1.0)
    parser.add_argument("--feature-weight", type=float, default=1.0)
    parser.add_argument("--feature-kind", choices=("cosine", "mse"), default="cosine")
    parser.add_argument("--fast-fake-quant", action="store_true", help="F.linear on dequantized operands instead of the exact integer path")


def distillation_loss(args) -> DistillationLoss:
    return DistillationLoss(args.contrastive_weight, args.kd_weight, args.kd_temperature, args.feature_weight, args.feature_kind)


def build_ptq_model(model: nn.Module, config: QuantConfig, calibration: str, calibration_data, float_model: nn.Module) -> nn.Module:
    """PTQ: dynamic per-token activations with absmax weights, or OMSE-calibrated (P4Q's baseline)."""
    if calibration == "none":
        return pyclipq_convert(deepcopy_model(model), config)

    static = pyclipq_convert(deepcopy_model(model), dataclasses.replace(config, activation="static"))
    calibrate(static, calibration_data, observer="omse", weight_observer="omse", float_model=float_model, progress=False)
    return static


def p4q_main(argv: list[str] | None = None, prog: str = "pyclipq train p4q") -> dict:
    """`p4q` command: P4Q (prompt + QAdapter + KD) on a low-bit PTQ test bed."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog=prog, description=p4q_main.__doc__)
    p4q_arguments(parser)
    # --lr is the adapter's AdamW rate. The defaults were tuned on the test bed (benchmarks/train_results.md).
    _common_arguments(parser, steps=600, lr=3e-3, batch=128)
    args = parser.parse_args(argv)
    train = train_config(args)
    testbed, test = _setup(args)
    tok, names, templates = testbed.tokenizer, testbed.classnames, testbed.templates
    config = QuantConfig(args.format, group_size=args.group_size)
    started = time.perf_counter()
    fp32 = zero_shot_top1(testbed.model, tok, names, templates, test, args.eval_device)
    pairs = TestbedPairs(args.train_scenes, args.batch_size, tok)
    data = pairs.with_labels()
    calibration = [(images, tokens) for images, tokens, _ in itertools.islice(pairs, args.calibration_batches)]
    ptq_model = build_ptq_model(testbed.model, config, args.calibration, calibration, testbed.model)
    ptq = zero_shot_top1(ptq_model, tok, names, templates, test, args.eval_device)
    print(f"fp32 top-1 {fp32:.4f}   {args.format} PTQ top-1 {ptq:.4f}", flush=True)
    result = p4q(
        ptq_model, testbed.model, tok, names, data, templates=templates, n_ctx=args.n_ctx, position=args.position,
        ctx_init=args.ctx_init, alpha=args.alpha, reduction=args.reduction, adapter_layer=args.adapter_format,
        lam=args.lam, temperature=args.temperature, prompt_lr=args.prompt_lr, adapter_lr=args.lr, train=train,
        resume=args.resume,
    )
    after = p4q_top1(result.exported, test, args.eval_device)  # packed kernels end to end
    pyclipq_io.save(result.exported.ptq_model, args.out / "ptq_model.safetensors")
    save_p4q_head(result.exported, args.out / "p4q_head.safetensors")
    gap = fp32 - ptq
    return _write_results(args, "p4q", argv, {
        "recipe": f"p4q-{args.format}", "calibration": args.calibration, "eval_scenes": args.eval_scenes,
        "fp32_top1": fp32, "ptq_top1": ptq, "after_top1": after,
        "gap_recovered": (after - ptq) / gap if gap > 0 else math.nan,
        "loss_first": result.history[0]["loss"] if result.history else None,
        "loss_last": result.history[-1]["loss"] if result.history else None,
        "seconds": round(time.perf_counter() - started, 1),
        "train": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(train).items()},
    })


def p4q_arguments(parser: argparse.ArgumentParser) -> None:
    """P4Q's options: the PTQ format and calibration, the prompt and the QAdapter."""
    parser.add_argument("--format", choices=tuple(formats.FORMATS), default="int4")
    parser.add_argument("--group-size", type=int, default=None, help="int4/int2 group (0 = per channel); default: the format's")
    parser.add_argument("--calibration", choices=("none", "omse"), default="omse",
                        help="none: absmax weights, dynamic activations; omse: OMSE weights + static activations (P4Q's baseline)")
    parser.add_argument("--calibration-batches", type=int, default=8, help="train batches fed to OMSE calibration")
    parser.add_argument("--n-ctx", type=int, default=8, help="context vectors (the paper's 16 do not fit the test bed's 16-token context)")
    parser.add_argument("--position", choices=("end", "front", "middle"), default="end")
    parser.add_argument("--ctx-init", default=None, help="initial context phrase with exactly --n-ctx tokens (default: random)")
    parser.add_argument("--alpha", type=float, default=0.2)
    parser.add_argument("--reduction", type=int, default=4)
    parser.add_argument("--adapter-format", choices=tuple(formats.FORMATS), default="int8")
    parser.add_argument("--lam", type=float, default=1.0)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--prompt-lr", type=float, default=1e-2, help="SGD (momentum 0.9) learning rate of the prompt")


def save_p4q_head(exported: ExportedP4Q, path) -> None:
    """The P4Q parts outside the PTQ model (packed adapter, class embeddings) as one safetensors file."""
    tensors = {f"adapter.{k}": v.detach().cpu().contiguous() for k, v in exported.adapter.state_dict().items() if v is not None}
    tensors["class_embeddings"] = exported.class_embeddings.detach().cpu().contiguous()
    layer = exported.adapter.fc1.layer
    metadata = {"pyclipq_p4q": json.dumps({
        "classnames": exported.classnames, "alpha": exported.adapter.alpha, "dim": exported.adapter.dim,
        "hidden": exported.adapter.hidden, "adapter_layer": layer.to_dict(),
    })}
    save_file(tensors, str(path), metadata=metadata)


def load_p4q_head(ptq_model: nn.Module, path) -> ExportedP4Q:
    """Rebuild an ExportedP4Q from a loaded PTQ model (pyclipq.load) and a save_p4q_head file."""
    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get("pyclipq_p4q")
    if raw is None:
        raise ValueError(f"path: {path} is not a P4Q head written by save_p4q_head (no 'pyclipq_p4q' metadata)")
    meta = json.loads(raw)
    tensors = load_file(str(path))
    layer = LayerConfig.from_dict(meta["adapter_layer"])
    adapter = QAdapter.__new__(QAdapter)
    nn.Module.__init__(adapter)
    adapter.dim, adapter.hidden, adapter.alpha = meta["dim"], meta["hidden"], meta["alpha"]
    adapter.fc1 = QuantLinear(meta["dim"], meta["hidden"], bias=False, layer=layer)
    adapter.fc2 = QuantLinear(meta["hidden"], meta["dim"], bias=False, layer=layer)
    adapter.load_state_dict({k[len("adapter."):]: v for k, v in tensors.items() if k.startswith("adapter.")})
    return ExportedP4Q(ptq_model, adapter, tensors["class_embeddings"], meta["classnames"])


COMMANDS = {"ternary": ternary_main, "p4q": p4q_main}


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        raise SystemExit(f"usage: python -m pyclipq.train.recipes {{{','.join(COMMANDS)}}} [options]  (got {argv[:1] or 'nothing'})")
    return COMMANDS[argv[0]](argv[1:], prog=f"python -m pyclipq.train.recipes {argv[0]}")


if __name__ == "__main__":
    main()
