"""`pyclipq train {ternary,p4q,distill} --model ... --data ...`: the recipes on the user's own model and
data, in one process or under torchrun (pyclipq.train.distributed), ending with the packed model saved.

    pyclipq train ternary --model ViT-B-32 --pretrained ckpt.bin --data pairs.csv --out runs/t
    torchrun --nproc-per-node 8 -m pyclipq.cli train ternary --model hf:./clip --data 'wds:shards/{0000..0999}.tar' --out runs/t
    pyclipq train p4q --model ViT-B-32 --pretrained ckpt.bin --data imagefolder:/data/train --format int4 --out runs/p
    pyclipq train distill --model hf:./all-MiniLM-L6-v2 --data texts.txt --format ternary --out runs/d
    pyclipq train distill --model ViT-B-32 --pretrained ckpt.bin --data folder:/photos --data captions.txt --format int2 --out runs/d

Without --model/--data, ternary and p4q run on the shipped test bed (testbed_recipes).
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import shlex
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

import pyclipq

from ..configs import QuantConfig
from ..train.distill import FEATURE_KINDS, HIDDEN_BLOCKS, EncoderDistillationLoss
from ..embed import cpu_threads_per_process
from ..eval import imagenet_templates
from .. import data as train_data
from ..train import recipes
from ..distributed import DistributedContext, barrier, init_distributed, shutdown_distributed
from . import testbed_recipes
from .loading import LoadedModel, config_from_args, load_model

# `pyclipq train distill`: the defaults of benchmarks/bench_distill_real.py's measurements
# on all-MiniLM-L6-v2 (README, "Distillation QAT"), for 2 vCPUs and about 30 minutes.
# 6000 steps: 27 minutes for all-MiniLM-L6-v2 on 2 vCPUs (benchmarks/README.md, "Distillation QAT");
# int2 gained from 2860 to 6230 steps, ternary and int4 held. lr None: recipes.default_lr of the format
DISTILL_DEFAULTS = {"steps": 6000, "lr": None, "batch": 16}
DISTILL_JOIN_TEXTS = 0.0


def wants_own_data(argv: list[str]) -> bool:
    return any(a == "--data" or a.startswith("--data=") for a in argv)


def _unlabelled_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", action="append", required=True, metavar="SOURCE",
                        help="unlabelled data, once per source: texts (FILE.txt, one a line, or csv:FILE with "
                             "--text-column), images (folder:DIR, searched recursively, wds:SHARDS, or csv:FILE "
                             "with --image-column), or one CSV with both columns (image-text rows)")
    parser.add_argument("--text-column", default=None, help="CSV column of texts")
    parser.add_argument("--image-column", default=None, help="CSV column of image paths (relative to the CSV)")
    parser.add_argument("--shuffle-buffer", type=int, default=1000, help="webdataset sample shuffle buffer")
    parser.add_argument("--no-length-grouping", dest="group_by_length", action="store_false",
                        help="batch texts in plain random order (default: texts of similar length share a batch, "
                             "which cuts a padded text encoder's step time)")
    parser.add_argument("--join-texts", type=float, default=DISTILL_JOIN_TEXTS, metavar="FRACTION",
                        help="the fraction of each text source's texts that are followed by a second text of the "
                             "source, so that the student also sees sequences longer than the source's own "
                             f"(0: the texts as given; default {DISTILL_JOIN_TEXTS:g})")


def _pair_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True,
                        help="image-caption pairs: csv:FILE (.csv/.tsv) or wds:SHARDS (a folder of .tar, a brace pattern)")
    parser.add_argument("--image-column", default="image", help="CSV column of image paths (relative to the CSV)")
    parser.add_argument("--caption-column", default="caption", help="CSV column of captions")
    parser.add_argument("--shuffle-buffer", type=int, default=1000, help="webdataset sample shuffle buffer")


def _labelled_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="labelled images: imagefolder:DIR (one sub-folder per class)")
    parser.add_argument("--classnames", type=Path, default=None,
                        help="a text file, one class name a line in the folders' sorted order (default: the folder names)")
    parser.add_argument("--templates", type=Path, default=None,
                        help="a text file of prompt templates with {} (default: the ImageNet templates)")


def _arguments(parser: argparse.ArgumentParser, data_arguments) -> None:
    parser.add_argument("--model", required=True, help="open_clip name, hf:<id|dir>, openai:<file>, testbed")
    parser.add_argument("--pretrained", default=None, help="open_clip pretrained tag or local checkpoint path")
    data_arguments(parser)
    parser.add_argument("--workers", type=int, default=4, help="DataLoader workers per process (decode + preprocess)")
    parser.add_argument("--strict-images", action="store_true", help="stop at a bad image instead of skipping it")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: this rank's GPU when there is one, else the CPU")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                        help="auto: bf16 autocast on a GPU, fp32 on the CPU")


def _lines(path: Path, argument: str) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"{argument}: {path} not found")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{argument}: {path} is empty")
    return lines


def _pairs(args, loaded: LoadedModel):
    kind, path = train_data.parse_data_spec(args.data)
    strict = args.strict_images
    if kind == "csv":
        dataset = train_data.CaptionPairs.from_csv(path, loaded.preprocess, image_column=args.image_column,
                                                   caption_column=args.caption_column, strict=strict)
        return train_data.train_loader(dataset, args.batch_size, train_data.PairCollate(loaded.tokenize),
                                       workers=args.workers, seed=args.seed, pin_memory=torch.cuda.is_available())
    if kind == "wds":
        return train_data.webdataset_pairs(path, loaded.preprocess, loaded.tokenize, args.batch_size, workers=args.workers,
                                           shuffle_buffer=args.shuffle_buffer, strict=strict)
    raise ValueError(f"--data: the ternary recipe trains on image-caption pairs (csv: or wds:), got {kind}:{path}")


def _run_ternary(args, loaded: LoadedModel, train, context: DistributedContext) -> dict:
    data = _pairs(args, loaded)
    result = recipes.ternary_clip(loaded.model, data, preset=args.preset, threshold_rule=args.threshold_rule, train=train,
                                  loss=testbed_recipes.distillation_loss(args), exact=not args.fast_fake_quant, resume=args.resume,
                                  distributed=context)
    model_path = args.out / "model.safetensors"
    if context.is_main:
        pyclipq.save(result.quantized, model_path)
    return {"recipe": f"ternary-{args.preset}", "model": str(model_path), "history": result.history,
            "skipped_images": _total(result.trainer.skipped, context)}


def _run_p4q(args, loaded: LoadedModel, train, context: DistributedContext) -> dict:
    kind, path = train_data.parse_data_spec(args.data)
    if kind not in ("imagefolder", "folder"):
        raise ValueError(f"--data: P4Q trains on labelled images (imagefolder:DIR), got {kind}:{path}")
    dataset = train_data.LabelledImages(path, loaded.preprocess, strict=args.strict_images)
    classnames = _lines(args.classnames, "--classnames") if args.classnames else dataset.classnames
    if len(classnames) != len(dataset.classnames):
        raise ValueError(f"--classnames: {len(classnames)} names for {len(dataset.classnames)} class folders")
    templates = _lines(args.templates, "--templates") if args.templates else imagenet_templates()
    data = train_data.train_loader(dataset, args.batch_size, train_data.LabelledCollate(), workers=args.workers,
                                   seed=args.seed, pin_memory=torch.cuda.is_available())
    # OMSE calibration sees images with the prompt of their class, as a CLIP forward needs text too
    calibration = [(images, loaded.tokenize([templates[0].format(classnames[int(c)]) for c in labels]))
                   for images, labels, _ in itertools.islice(data, args.calibration_batches)]
    config = QuantConfig(args.format, group_size=args.group_size)
    ptq_model = recipes.build_ptq_model(loaded.model, config, args.calibration, calibration, loaded.model)
    result = recipes.p4q(ptq_model, loaded.model, loaded.tokenize, classnames, data, templates=templates, n_ctx=args.n_ctx,
                         position=args.position, ctx_init=args.ctx_init, alpha=args.alpha, reduction=args.reduction,
                         adapter_layer=args.adapter_format, lam=args.lam, temperature=args.temperature,
                         prompt_lr=args.prompt_lr, adapter_lr=args.lr, train=train, resume=args.resume, distributed=context)
    if context.is_main:
        pyclipq.save(result.exported.ptq_model, args.out / "ptq_model.safetensors")
        recipes.save_p4q_head(result.exported, args.out / "p4q_head.safetensors")
    return {"recipe": f"p4q-{args.format}", "model": str(args.out / "ptq_model.safetensors"),
            "head": str(args.out / "p4q_head.safetensors"), "history": result.history}


def _number_between(flag: str, low: float, high: float, expected: str):
    """An argparse type: a number strictly between `low` and `high`, refused with `flag` and
    `expected` named."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not low < value < high:  # NaN fails too
            raise argparse.ArgumentTypeError(f"{flag} must be {expected}, got {text!r}")
        return value
    return parse


def _fraction(flag: str):
    """An argparse type: a number in (0, 1)."""
    return _number_between(flag, 0.0, 1.0, "a number in (0, 1)")


def _positive(flag: str):
    """An argparse type: a finite number > 0."""
    return _number_between(flag, 0.0, math.inf, "a number > 0")


def distill_arguments(parser: argparse.ArgumentParser) -> None:
    """Label-free distillation QAT's options: the format and the loss."""
    parser.add_argument("--format", default="ternary",
                        help="int8, int4, int2, ternary or a preset name (pyclipq.configs.PRESETS)")
    parser.add_argument("--group-size", type=int, default=None, help="the format's group size (default: the format's)")
    parser.add_argument("--activation", default=None, choices=["dynamic", "static", "none"])
    parser.add_argument("--embedding-weight", type=float, default=1.0, help="weight of the output-embedding term")
    parser.add_argument("--embedding-kind", choices=FEATURE_KINDS, default="cosine")
    parser.add_argument("--hidden-weight", type=float, default=recipes.DEFAULT_HIDDEN_WEIGHT,
                        help="weight of the hidden-state term, relative to the embedding's (0: the embedding alone)")
    parser.add_argument("--hidden-blocks", choices=HIDDEN_BLOCKS, default="all",
                        help="match every transformer block's output, or the last block's only")
    parser.add_argument("--attention-weight", type=float, default=None,
                        help="weight of the attention-map term: KL between every block's attention distributions, "
                             "for Hugging Face BERT-like and CLIP attention (0: off). Default: "
                             f"{recipes.DEFAULT_ATTENTION_WEIGHT:g} where the model's attention shows its queries and keys, "
                             "0 for nn.MultiheadAttention (open_clip, OpenAI)")
    parser.add_argument("--init", choices=("auto", "clip", "ptq", "rtn"), default="auto",
                        help="where the student starts: rtn (the float weights), clip (clamped to weight-MSE-optimal "
                             "scales), ptq (GPTQ + clip search on --calibration-batches batches); auto: rtn for "
                             "ternary, ptq for int4, clip for int8/int2")
    parser.add_argument("--calibration-batches", type=int, default=recipes.DEFAULT_CALIBRATION_BATCHES,
                        help="batches the ptq start calibrates on (default: %(default)s)")
    parser.add_argument("--rotation", type=_rotation, default="auto",
                        help="block size of an online Hadamard rotation of every quantized linear's input (0: none); "
                             "QAT trains through it and the packed model keeps it. auto: 128 for int4 and ternary, "
                             "none otherwise (recipes.default_rotation)")
    parser.add_argument("--fake-quant", choices=("auto", "exact", "fast"), default="auto",
                        help="fast: F.linear on dequantized operands; exact: the kernels' integer math; "
                             "auto: fast (measured faster for every format, and as good). The export is exact either way")
    parser.add_argument("--scales", choices=("auto", "rule", "learned"), default="auto",
                        help="weight scales: the format rule's, or learned (LSQ, started at the rule's; trains through "
                             "the fast fake-quant; the export packs the learned scales); auto: learned for int2 and int4, the "
                             "rule otherwise")
    parser.add_argument("--minutes", type=_positive("--minutes"), default=None,
                        help="a training-time budget in place of --steps: the run times its own first steps and "
                             "trains as many as fit, re-reckoning the count from its latest pace as it goes, the "
                             "warm-up + cosine schedule ending there (the evaluations and the ptq start are not "
                             "counted)")
    parser.add_argument("--dampen", type=_positive("--dampen"), default=None, metavar="STRENGTH",
                        help="oscillation dampening: add the latent weights' mean squared distance from their levels "
                             "(in units of their scales) to the loss, its weight rising from 0 to STRENGTH along the run "
                             "(recipes.distill's dampen). Default: off")
    parser.add_argument("--progressive", choices=recipes.PROGRESSIVE_ORDERS, default=None,
                        help="bring the quantization in progressively over the first --progressive-fraction of the "
                             "steps: every weight's share of its rounding error rising from 0 to 1 at once (together), "
                             "or one weight after the other from the input side (bottom-up) or the output side "
                             "(top-down) (recipes.distill's progressive). Default: quantized from the first step")
    parser.add_argument("--progressive-fraction", type=_fraction("--progressive-fraction"), default=0.3,
                        metavar="F", help="the share of the steps --progressive takes (default: 0.3)")
    parser.add_argument("--keep-padding", action="store_true",
                        help="match block outputs at a text encoder's padding tokens too (default: real tokens only)")
    parser.add_argument("--train-embeddings", action="store_true",
                        help="train the student's float token-embedding tables too (default: the teacher's are kept, "
                             "which measured as good and makes a step cheaper)")


def _run_distill(args, loaded: LoadedModel, train, context: DistributedContext) -> dict:
    data = train_data.unlabelled_batches(
        args.data, tokenizer=loaded.tokenize, transform=loaded.preprocess, global_batch=args.batch_size,
        text_column=args.text_column, image_column=args.image_column, workers=args.workers, seed=args.seed,
        strict=args.strict_images, shuffle_buffer=args.shuffle_buffer, group_by_length=args.group_by_length,
        join_texts=args.join_texts)
    attention_weight = args.attention_weight
    if attention_weight is None:
        attention_weight = recipes.DEFAULT_ATTENTION_WEIGHT if recipes.attention_maps_visible(loaded.model) else 0.0
    loss = EncoderDistillationLoss(args.embedding_weight, args.hidden_weight, args.embedding_kind, args.hidden_blocks,
                                   mask_padding=not args.keep_padding, attention_weight=attention_weight)
    exact = {"auto": None, "exact": True, "fast": False}[args.fake_quant]
    learn_scales = {"auto": None, "rule": False, "learned": True}[args.scales]
    if learn_scales and exact:
        raise ValueError("--scales learned trains through the fast fake-quant: drop --fake-quant exact")
    config = config_from_args(args)
    result = recipes.distill(loaded.model, data, config, init=args.init, calibration_batches=args.calibration_batches,
                             train=train, loss=loss, exact=exact, learn_scales=learn_scales, resume=args.resume,
                             distributed=context, freeze_embeddings=not args.train_embeddings, minutes=args.minutes,
                             dampen=args.dampen, progressive=args.progressive,
                             progressive_fraction=args.progressive_fraction)
    model_path = args.out / "model.safetensors"
    if context.is_main:
        pyclipq.save(result.quantized, model_path)
    return {"recipe": f"distill-{args.format}", "model": str(model_path), "steps": result.trainer.config.steps, "history": result.history,
            "skipped_images": _total(result.trainer.skipped, context)}


@dataclass(frozen=True)
class Recipe:
    """One `pyclipq train` recipe on the user's data: its options, training defaults and run."""

    data_arguments: Callable[[argparse.ArgumentParser], None]
    recipe_arguments: Callable[[argparse.ArgumentParser], None]
    training: dict  # steps, lr, batch: the defaults of training_arguments
    run: Callable
    needs_images: bool = True  # the model must have an image tower (preprocessing)


RECIPES = {
    "ternary": Recipe(_pair_data_arguments, testbed_recipes.ternary_arguments, {"steps": 1000, "lr": 1e-4, "batch": 256},
                      _run_ternary),
    # --lr: the QAdapter's AdamW rate
    "p4q": Recipe(_labelled_data_arguments, testbed_recipes.p4q_arguments, {"steps": 600, "lr": 3e-3, "batch": 128},
                  _run_p4q),
    "distill": Recipe(_unlabelled_data_arguments, distill_arguments, DISTILL_DEFAULTS, _run_distill, needs_images=False),
}


def _total(count: int, context: DistributedContext) -> int:
    if not context.is_distributed:
        return count
    total = torch.tensor(count, device=context.device)
    dist.all_reduce(total)
    return int(total)


def _rotation(text: str):
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a block size (0: none), got {text!r}") from None


def run_own_data(recipe: str, argv: list[str]) -> dict:
    """`pyclipq train RECIPE --model ... --data ...` (see the module doc); rank 0 writes results.json."""
    parser = argparse.ArgumentParser(prog=f"pyclipq train {recipe}", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    chosen = RECIPES[recipe]
    chosen.recipe_arguments(parser)
    testbed_recipes.training_arguments(parser, **chosen.training)
    _arguments(parser, chosen.data_arguments)
    parser.set_defaults(threads=None)  # this machine's CPUs shared by its processes (the test bed's default is 1)
    args = parser.parse_args(argv)
    if getattr(args, "rotation", None) == "auto":  # distill: the measured rotation of the format
        args.rotation = recipes.default_rotation(config_from_args(argparse.Namespace(**{**vars(args), "rotation": 0})))
    if args.lr is None:  # distill: the measured rate of the format
        args.lr = recipes.default_lr(config_from_args(args))
    context = init_distributed(args.device)
    try:
        torch.set_num_threads(args.threads or cpu_threads_per_process(context.local_world_size))
        torch.manual_seed(args.seed)
        precision = args.precision if args.precision != "auto" else ("bf16" if context.device.type == "cuda" else "fp32")
        args.device, args.precision = str(context.device), precision
        train = testbed_recipes.train_config(args)
        loaded = load_model(args.model, args.pretrained)
        if loaded.preprocess is None and chosen.needs_images:
            raise ValueError(f"--model: {loaded.label} has no image preprocessing (the {recipe} recipe trains on images)")
        started = time.perf_counter()
        results = chosen.run(args, loaded, train, context)
        barrier()
    finally:
        shutdown_distributed()
    history = results.pop("history")
    results.update({
        "model_spec": args.model, "pretrained": args.pretrained, "data": args.data, "world_size": context.world_size,
        "loss_first": history[0]["loss"] if history else None, "loss_last": history[-1]["loss"] if history else None,
        "seconds": round(time.perf_counter() - started, 1),
        "train": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(train).items()},
        "command": f"pyclipq train {recipe} " + shlex.join(argv),
    })
    if context.is_main:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        print(json.dumps(results, indent=2), flush=True)
    return results
