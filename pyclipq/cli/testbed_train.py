"""Train the test-bed CLIP contrastively and write the weights shipped in pyclipq/testbed/weights.

    nice -n 19 python -m pyclipq.cli.testbed_train

The defaults are the recipe of the shipped weights; the exact command line is recorded in the
metadata JSON next to them, with the measured fp32 zero-shot accuracy on the test split.
"""
from __future__ import annotations

import argparse
import math
import platform
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..eval.zero_shot import zero_shot_accuracy, zero_shot_classifier
from ..testbed.captions import ZERO_SHOT_TEMPLATES
from ..testbed.model import WEIGHTS_DIR, TestbedConfig, build_model, save_testbed
from ..testbed.scenes import class_names
from ..testbed.splits import TestbedSplit, iterate_batches, make_split


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup-steps", type=int, default=100)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial weights; the data has its own seeds")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--patch-size", type=int, default=TestbedConfig.patch_size)
    parser.add_argument("--vision-width", type=int, default=TestbedConfig.vision_width)
    parser.add_argument("--text-width", type=int, default=TestbedConfig.text_width)
    parser.add_argument("--vision-pool", default=TestbedConfig.vision_pool, choices=("tok", "avg"))
    parser.add_argument("--vision-layers", type=int, default=TestbedConfig.vision_layers)
    parser.add_argument("--text-layers", type=int, default=TestbedConfig.text_layers)
    parser.add_argument("--embed-dim", type=int, default=TestbedConfig.embed_dim)
    parser.add_argument("--val-every", type=int, default=200)
    parser.add_argument("--val-scenes", type=int, default=2048)
    parser.add_argument("--test-scenes", type=int, default=10240)
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR)
    return parser.parse_args(argv)


def contrastive_loss(image_features, text_features, logit_scale, matches: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE with every true (image, caption) pair as a positive, weighted uniformly.

    Scenes of one class are common within a batch, and a caption that leaves out size or
    position describes several of them. Treating those pairs as negatives, as the plain CLIP
    loss does, would punish the model for being right.
    """
    logits = logit_scale * image_features @ text_features.T
    targets = matches.float()
    image_to_text = F.cross_entropy(logits, targets / targets.sum(dim=1, keepdim=True))
    text_to_image = F.cross_entropy(logits.T, (targets / targets.sum(dim=0, keepdim=True)).T)
    return (image_to_text + text_to_image) / 2


def learning_rate(step: int, args: argparse.Namespace) -> float:
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps)
    return args.lr * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    # As in CLIP: no weight decay on gains, biases, embeddings or the temperature.
    decayed, exempt = [], []
    for name, parameter in model.named_parameters():
        if parameter.ndim < 2 or "embedding" in name or "logit_scale" in name:
            exempt.append(parameter)
        else:
            decayed.append(parameter)
    groups = [{"params": decayed, "weight_decay": args.weight_decay}, {"params": exempt, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.98), eps=1e-6)


def evaluate_zero_shot(model, tokenizer, data: TestbedSplit, device) -> dict[str, float]:
    classifier = zero_shot_classifier(model, tokenizer, class_names(), ZERO_SHOT_TEMPLATES, device=device, progress=False)
    return zero_shot_accuracy(model, classifier, data.loader(512), device=device, progress=False)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    config = TestbedConfig(
        embed_dim=args.embed_dim,
        patch_size=args.patch_size,
        vision_width=args.vision_width,
        text_width=args.text_width,
        vision_pool=args.vision_pool,
        vision_layers=args.vision_layers,
        text_layers=args.text_layers,
    )
    tokenizer = config.tokenizer()
    model = build_model(config).to(args.device)
    optimizer = make_optimizer(model, args)
    validation = make_split("val", args.val_scenes)
    parameters = sum(p.numel() for p in model.parameters())
    print(f"test-bed CLIP: {parameters / 1e6:.2f}M parameters, {len(class_names())} classes", flush=True)

    started, cpu_started = time.perf_counter(), time.process_time()
    history = []
    batches = iterate_batches("train", args.batch_size)
    for step in range(args.steps):
        model.train()
        data = next(batches)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args)
        image_features, text_features, logit_scale = model(
            data.images.to(args.device), tokenizer(data.captions).to(args.device)
        )
        loss = contrastive_loss(image_features, text_features, logit_scale, data.caption_matches().to(args.device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            # CLIP's clamp: a temperature above 100 makes the loss unstable.
            model.logit_scale.clamp_(0, math.log(100))
        if (step + 1) % args.val_every == 0 or step + 1 == args.steps:
            accuracy = evaluate_zero_shot(model, tokenizer, validation, args.device)
            elapsed = time.perf_counter() - started
            history.append({"step": step + 1, "loss": loss.item(), "val_top1": accuracy["top1"], "seconds": elapsed})
            print(
                f"step {step + 1:5d}  loss {loss.item():.4f}  val top1 {accuracy['top1']:.4f}  "
                f"top5 {accuracy['top5']:.4f}  {elapsed:.0f}s",
                flush=True,
            )
    training_seconds = time.perf_counter() - started
    # CPU time over all threads: on a shared machine wall time says more about the neighbours.
    training_cpu_seconds = time.process_time() - cpu_started

    test = evaluate_zero_shot(model, tokenizer, make_split("test", args.test_scenes), args.device)
    print(f"test zero-shot top1 {test['top1']:.4f}  top5 {test['top5']:.4f}  ({test['n']} scenes)", flush=True)
    metadata = {
        "reproduce": "python -m pyclipq.cli.testbed_train " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "training": {
            "arguments": {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()},
            "seconds": round(training_seconds, 1),
            "cpu_seconds": round(training_cpu_seconds, 1),
            "machine": cpu_model(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "history": history,
        },
        "zero_shot_test_fp32": {
            "top1": round(test["top1"], 4),
            "top5": round(test["top5"], 4),
            "scenes": test["n"],
            "templates": list(ZERO_SHOT_TEMPLATES),
        },
    }
    save_testbed(model.cpu(), config, metadata, args.out)
    print(f"wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
