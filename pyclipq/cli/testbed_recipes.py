"""The test-bed recipe commands: `pyclipq train ternary|p4q` on the shipped tiny CLIP and its data
(the user's own model and data: train_command, which shares the training options defined here).
The recipes themselves are pyclipq.train.recipes.

Each command loads the shipped test-bed CLIP (pyclipq.testbed), measures fp32 and PTQ zero-shot
top-1 on the test split, trains, converts to the packed kernels, measures again on those kernels,
saves the model with pyclipq.save, and writes results.json.

    python -m pyclipq.cli.testbed_recipes ternary --preset qall --out runs/ternary
    python -m pyclipq.cli.testbed_recipes p4q --format int4 --out runs/p4q
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from .. import formats
from .. import io as pyclipq_io
from ..configs import QuantConfig
from ..convert import convert as pyclipq_convert
from ..testbed import load_testbed, make_split
from ..train.distill import DistillationLoss
from ..train.qat import deepcopy_model
from ..train.recipes import (
    TERNARY_PRESETS,
    TestbedPairs,
    build_ptq_model,
    p4q,
    p4q_top1,
    save_p4q_head,
    ternary_clip,
    ternary_config,
    zero_shot_top1,
)
from ..train.trainer import TrainConfig

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


def _start(argv, prog: str, description: str, recipe_arguments, steps: int, lr: float, batch: int):
    """A test-bed command's start: (argv, its options, TrainConfig, the test bed, the test loader)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog=prog, description=description)
    recipe_arguments(parser)
    _common_arguments(parser, steps=steps, lr=lr, batch=batch)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    return argv, args, train_config(args), load_testbed(args.testbed), make_split("test", args.eval_scenes).loader(512)


def _write_results(args, command: str, argv, results: dict) -> dict:
    results["command"] = f"pyclipq train {command} " + shlex.join(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: v for k, v in results.items() if k != "history"}, indent=2), flush=True)
    return results


def ternary_main(argv: list[str] | None = None, prog: str = "pyclipq train ternary") -> dict:
    """`ternary` command: TernaryCLIP QAT + KD on the test bed."""
    argv, args, train, testbed, test = _start(argv, prog, ternary_main.__doc__, ternary_arguments, steps=600, lr=5e-4,
                                              batch=128)
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




def p4q_main(argv: list[str] | None = None, prog: str = "pyclipq train p4q") -> dict:
    """`p4q` command: P4Q (prompt + QAdapter + KD) on a low-bit PTQ test bed."""
    # --lr is the adapter's AdamW rate. The defaults were tuned on the test bed (benchmarks/train_results.md).
    argv, args, train, testbed, test = _start(argv, prog, p4q_main.__doc__, p4q_arguments, steps=600, lr=3e-3, batch=128)
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






COMMANDS = {"ternary": ternary_main, "p4q": p4q_main}


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        raise SystemExit(f"usage: python -m pyclipq.cli.testbed_recipes {{{','.join(COMMANDS)}}} [options]  (got {argv[:1] or 'nothing'})")
    return COMMANDS[argv[0]](argv[1:], prog=f"python -m pyclipq.cli.testbed_recipes {argv[0]}")


if __name__ == "__main__":
    main()
