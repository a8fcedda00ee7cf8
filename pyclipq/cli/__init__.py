"""The `pyclipq` command line: info, bench, convert, eval, train, embed.

User mistakes (unknown model or format, missing file, no internet for a pretrained tag)
end with a one-line error and exit code 2, never a traceback.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys

import pyclipq

from ..convert import linear_inventory
from . import testbed_recipes
from . import bench as benchmark
from . import embed_command, train_command
from .bench import PYCLIPQ_FORMATS, RUNTIME_PEERS
from .calibration import calibration_batches
from .eval_command import run_eval
from .loading import ModelLoadError, config_from_args, load_model

EXAMPLES = """examples:
  pyclipq info
  pyclipq bench                                   # ViT-B-32, random weights, every format
  pyclipq bench --formats int8 ternary --batches 1 8 --json
  pyclipq bench --peers ort_int8 openvino_int8    # only these runtime peers (needs pyclipq[peers])
  pyclipq bench --isa avx2,scalar                 # the formats also on these CPU kernel tables (forced)
  pyclipq convert ViT-B-32 --format ternary -o vitb32-ternary.safetensors
  pyclipq convert ViT-B-32 --pretrained ./open_clip_model.bin --format int4 -o out.safetensors
  pyclipq eval testbed --format ternary           # zero-shot + fidelity on the shipped test bed
  pyclipq eval ViT-B-32 --pretrained ckpt.bin --quantized out.safetensors --dataset imagefolder:/data/val
  pyclipq train ternary --preset qall --steps 600 --out runs/ternary   # TernaryCLIP QAT + KD on the test bed
  pyclipq train p4q --format int4 --out runs/p4q                       # P4Q prompt + QAdapter on a PTQ model
  pyclipq train ternary --help                                          # every option of a recipe
  pyclipq train ternary --model ViT-B-32 --pretrained ckpt.bin --data pairs.csv --out runs/own    # your model and data
  torchrun --nproc-per-node 8 -m pyclipq.cli train ternary --model ViT-B-32 --pretrained ckpt.bin --data 'wds:shards/{0000..0999}.tar' --out runs/own
  pyclipq train distill --model hf:./all-MiniLM-L6-v2 --data texts.txt --format ternary --out runs/d   # label-free, your texts
  pyclipq train distill --model ViT-B-32 --pretrained ckpt.bin --data folder:photos/ --data captions.txt --format int2 --out runs/d
  pyclipq embed ViT-B-32 --pretrained ckpt.bin --format int8 --input images/ --out emb/   # resumable shards
  torchrun --nproc-per-node 4 -m pyclipq.cli embed ViT-B-32 --quantized m.safetensors --input 'wds:shards/{0000..0999}.tar' --out emb/
"""


class UserError(Exception):
    pass


def _print(args, payload, text: str) -> None:
    print(json.dumps(payload, indent=2) if args.json else text)


def cmd_info(args) -> int:
    info = pyclipq.build_info()
    text = "\n".join(f"{k}: {v}" for k, v in info.items())
    _print(args, info, text)
    return 0


def _notice(command: str, text: str) -> None:
    # on stderr, so that --json output stays one JSON document
    print(f"pyclipq {command}: {text}", file=sys.stderr)


def cmd_bench(args) -> int:
    # Optional packages are checked before minutes of work, not when their turn comes.
    runtime_peers, skipped = benchmark.select_runtime_peers(args.peers)
    isas = benchmark.check_isas(args.isa, argument="--isa")
    if skipped:
        _notice("bench", skipped)
    plot = benchmark.plot_available()
    if not plot:
        _notice("bench", "matplotlib is not installed, so bench.png is skipped; pip install 'pyclipq[plot]' to draw it")
    report = benchmark.run_benchmark(model=args.model, pretrained=args.pretrained, formats=tuple(args.formats),
                                     batches=tuple(args.batches), threads=args.threads, reps=args.reps,
                                     warmup=args.warmup, progress=not args.json and not args.no_progress,
                                     runtime_peers=runtime_peers, compiled=args.compile, isas=isas,
                                     rounds=args.rounds)
    paths = benchmark.write_report(report, args.out, plot=plot)
    report["files"] = paths
    for failure in report["runtime_peers_failed"]:
        _notice("bench", failure["error"])
    _print(args, report, benchmark.format_table(report) + f"\nwrote {' and '.join(paths.values())}")
    return 0


def _smooth_arg(value):
    if value is None or value == "search":
        return value
    try:
        return float(value)
    except ValueError:
        raise UserError(f"--smooth takes an alpha in [0, 1] or 'search', got {value!r}") from None


def _calibrate_from_args(args, loaded, model, float_model) -> str:
    """Run pyclipq.calibrate on the user's files when --calibrate is given; the report's text."""
    method_flags = args.smooth is not None or args.gptq or args.clip_search or args.weight_observer
    if not args.calibrate:
        if method_flags:
            raise UserError("--smooth, --gptq, --clip-search and --weight-observer need calibration inputs: --calibrate PATH")
        return ""
    batches = calibration_batches(loaded, args.calibrate, args.calibrate_batches, args.calibrate_batch_size)
    report = pyclipq.calibrate(
        model, batches, observer=args.observer, num_batches=len(batches), weight_observer=args.weight_observer,
        gptq=args.gptq, clip_search=args.clip_search, smooth=_smooth_arg(args.smooth),
        dynamic_fallback=args.dynamic_fallback, float_model=float_model, progress=not args.json,
    )
    return str(report)


def cmd_convert(args) -> int:
    out = args.output
    if os.path.dirname(out) and not os.path.isdir(os.path.dirname(out)):
        raise UserError(f"output directory does not exist: {os.path.dirname(out)}")
    loaded = load_model(args.model, args.pretrained)
    config = config_from_args(args)
    float_model = copy.deepcopy(loaded.model) if args.calibrate else None
    model = pyclipq.convert(loaded.model, config)
    calibration = _calibrate_from_args(args, loaded, model, float_model)
    pyclipq.save(model, out)

    quantized, total = linear_inventory(model)
    payload = {"model": loaded.label, "format": args.format, "output": out, "bytes": os.path.getsize(out),
               "linears_quantized": quantized, "linears_total": total}
    if calibration:
        payload["calibration"] = calibration
    _print(args, payload, (calibration + "\n" if calibration else "") + f"{loaded.label} -> {out} "
           f"({payload['bytes'] / 1e6:.1f} MB, {quantized}/{total} linears quantized, {args.format})")
    return 0


def cmd_eval(args) -> int:
    report = run_eval(args)
    _print(args, report, report.pop("_text", json.dumps(report, indent=2)))
    return 0


def cmd_train(args) -> int:
    # The recipe prints its own summary (JSON) and writes results.json under --out.
    if args.recipe not in testbed_recipes.COMMANDS or train_command.wants_own_data(args.recipe_args):
        train_command.run_own_data(args.recipe, args.recipe_args)
    else:
        testbed_recipes.COMMANDS[args.recipe](args.recipe_args)
    return 0


def cmd_embed(args) -> int:
    payload = embed_command.run_embed(args)
    if payload["rank"] == 0:  # one report per job, as torchrun runs every rank
        _print(args, payload, payload.pop("_text"))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pyclipq", description="Low-bit CLIP: kernels, conversion, benchmarks.",
                                epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp):
        sp.add_argument("--json", action="store_true", help="print JSON instead of text")

    sp = sub.add_parser("info", help="build info: ISA variants, chosen ISA, CUDA, Triton, torch")
    common(sp)
    sp.set_defaults(fn=cmd_info)

    sp = sub.add_parser("bench", help="end-to-end benchmark of a CLIP model in every format",
                        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sp.add_argument("--model", default="ViT-B-32", help="open_clip name, hf:<id|dir>, openai:<file>, testbed")
    sp.add_argument("--pretrained", default=None, help="open_clip pretrained tag or local checkpoint path")
    sp.add_argument("--formats", nargs="+", default=list(PYCLIPQ_FORMATS), choices=list(PYCLIPQ_FORMATS))
    sp.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32])
    sp.add_argument("--threads", type=int, default=2)
    sp.add_argument("--reps", type=int, default=5, help="timed calls per round (the median is kept)")
    sp.add_argument("--rounds", type=int, default=1, help="rounds of --reps calls; the best round's median is kept")
    sp.add_argument("--warmup", type=int, default=2)
    sp.add_argument("--peers", nargs="+", default=["auto"], choices=["auto", "none", *RUNTIME_PEERS],
                    help="ONNX Runtime / OpenVINO contenders (pip install 'pyclipq[peers]'); "
                         "auto: every installed one (default)")
    sp.add_argument("--compile", action="store_true",
                    help="also time each format with its towers through torch.compile ('<format>+compile')")
    sp.add_argument("--isa", action="append", default=[], metavar="NAME",
                    help="also time the formats on this CPU kernel table ('<format> [NAME]', PYCLIPQ_CPU_ISA=NAME "
                         "in a process of its own); repeat or comma-separate; `pyclipq info` lists the tables")
    sp.add_argument("--out", default="results", help="directory for bench.json and bench.png")
    sp.add_argument("--no-progress", action="store_true")
    common(sp)
    sp.set_defaults(fn=cmd_bench)

    sp = sub.add_parser("convert", help="quantize a model and save it (safetensors)")
    sp.add_argument("model", help="open_clip name, hf:<id|dir>, openai:<file>, testbed")
    sp.add_argument("--pretrained", default=None)
    sp.add_argument("--format", required=True, help="int8, int4, int2, ternary or a preset name")
    sp.add_argument("--group-size", type=int, default=None)
    sp.add_argument("--activation", default=None, choices=["dynamic", "static", "none"])
    sp.add_argument("--rotation", type=int, default=0,
                    help="block size of an online Hadamard rotation of every linear's input (e.g. 128; 0: none)")
    sp.add_argument("-o", "--output", required=True)
    cal = sp.add_argument_group("calibration (pyclipq.calibrate on your own images or captions)")
    cal.add_argument("--calibrate", action="append", default=[], metavar="PATH",
                     help="a folder of images or a .txt file of captions (one per line); repeat to give both")
    cal.add_argument("--calibrate-batches", type=int, default=4)
    cal.add_argument("--calibrate-batch-size", type=int, default=8)
    cal.add_argument("--observer", default="omse", help="static activation observer: minmax, ema, percentile, omse")
    cal.add_argument("--weight-observer", default=None, help="re-choose weight scales with this observer (e.g. omse)")
    cal.add_argument("--gptq", action="store_true", help="GPTQ error-compensating rounding")
    cal.add_argument("--clip-search", action="store_true", help="weight scales with the least output error")
    cal.add_argument("--smooth", nargs="?", const="search", default=None, metavar="ALPHA",
                     help="SmoothQuant outlier migration: alpha searched per layer, or a fixed alpha")
    cal.add_argument("--dynamic-fallback", type=float, default=None, metavar="RATIO",
                     help="with --smooth: static layers whose error stays above RATIO x dynamic's become dynamic")
    common(sp)
    sp.set_defaults(fn=cmd_convert)

    sp = sub.add_parser("eval", help="zero-shot / retrieval / fidelity evaluation")
    sp.add_argument("model", help="open_clip name, hf:<id|dir>, openai:<file>, testbed")
    sp.add_argument("--pretrained", default=None)
    sp.add_argument("--format", default=None, help="convert to this format before evaluating")
    sp.add_argument("--quantized", default=None, help="a pyclipq checkpoint saved by `pyclipq convert`")
    sp.add_argument("--dataset", default="testbed",
                    help="testbed | imagefolder:DIR | cifar100:ROOT | retrieval:CSV")
    sp.add_argument("--batch-size", type=int, default=64)
    sp.add_argument("--limit", type=int, default=None, help="evaluate at most this many examples")
    sp.add_argument("--device", default="cpu")
    sp.add_argument("--no-progress", action="store_true")
    common(sp)
    sp.set_defaults(fn=cmd_eval)

    sp = sub.add_parser("train", help="QAT recipes, ternary (TernaryCLIP), p4q (P4Q) or distill (label-free "
                                      "distillation QAT): on the test bed, or --model/--data for your own "
                                      "(torchrun for several processes)",
                        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sp.add_argument("recipe", choices=sorted(train_command.RECIPES))
    sp.add_argument("recipe_args", nargs=argparse.REMAINDER,
                    help="the recipe's own options; `pyclipq train RECIPE --help` lists them")
    sp.set_defaults(fn=cmd_train)

    sp = sub.add_parser("embed", help="embed images or texts into resumable shards (one or many processes)",
                        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    embed_command.add_arguments(sp)
    common(sp)
    sp.set_defaults(fn=cmd_embed)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    try:
        return args.fn(args)
    except (UserError, ModelLoadError, FileNotFoundError, ValueError) as e:
        print(f"pyclipq {args.command}: error: {e}".splitlines()[0], file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
