"""Where a converted tower spends its time: torch.profiler, self CPU ms per forward pass, by op.

What is left between the linears is the fused-tower work's measure: this prints each op's share
of one forward of the image or text tower that `pyclipq.convert` returns, the way `pyclipq bench`
calls it (`pyclipq.cli.loading.encode`, pooled rows included).

A block whose linears share one config runs as the single op `pyclipq::transformer_block`, which
the profiler sees as one row. `--chain` runs those blocks as their chain of ops instead
(LayerNorm + quantize, the linears, attention, ...), bit-identical to the single op
(tests/test_fused_block.py), so that each op shows; the chain pays a few more dispatches, so its
wall time is a little higher.

    python benchmarks/profile_tower.py [--model ViT-B-32] [--format int8] [--batches 1 8]
        [--threads 2] [--calls 10] [--chain] [--json out.json]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import time
from unittest import mock

import torch
from torch.profiler import ProfilerActivity, profile

import pyclipq
from pyclipq.cli.loading import encode, load_model, random_inputs
from pyclipq.nn.fused_block import FusedBlock


def profile_tower(loaded, tower: str, batch: int, calls: int, chain: bool = False) -> dict:
    """{"wall_ms_per_forward", "ops": {name: {"ms", "calls"}}} per forward, the ops by self time."""
    images, tokens = random_inputs(loaded, batch)
    inputs = {"images": images} if tower == "image" else {"tokens": tokens}
    with contextlib.ExitStack() as stack, torch.inference_mode():
        if chain:  # on each block's own class: a Fused<Class> may hold its own _one_op
            for block_class in {type(m) for m in loaded.model.modules() if isinstance(m, FusedBlock)}:
                stack.enter_context(mock.patch.object(block_class, "_one_op", lambda self, resolved: False))
        for _ in range(3):
            encode(loaded, **inputs)
        start = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(calls):
                encode(loaded, **inputs)
        wall_ms = (time.perf_counter() - start) * 1e3 / calls
    ops = {}
    for event in prof.key_averages():
        if event.self_cpu_time_total > 0:
            ops[event.key] = {"ms": event.self_cpu_time_total / 1e3 / calls, "calls": event.count // calls}
    return {"wall_ms_per_forward": wall_ms, "ops": dict(sorted(ops.items(), key=lambda kv: -kv[1]["ms"]))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--format", default="int8")
    parser.add_argument("--towers", nargs="+", default=["image", "text"], choices=["image", "text"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--top", type=int, default=12, help="ops listed per case; the rest are summed")
    parser.add_argument("--chain", action="store_true", help="run single-op blocks as their chain of ops")
    parser.add_argument("--json", help="write the full profile here")
    args = parser.parse_args()
    for name in ("calls", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if min(args.batches) < 1:
        parser.error(f"--batches must all be at least 1, got {args.batches}")
    torch.set_num_threads(args.threads)
    loaded = load_model(args.model)
    loaded.model = pyclipq.convert(loaded.model, args.format)
    info = pyclipq.build_info()
    print(f"{args.model} {args.format}, CPU table {info['cpu_isa']}, {args.threads} threads, "
          f"{'chain of ops' if args.chain else 'blocks as one op where they can'}; self CPU ms per forward")
    report = {"model": args.model, "format": args.format, "cpu_isa": info["cpu_isa"], "threads": args.threads,
              "chain": args.chain, "cases": {}}
    for tower in args.towers:
        for batch in args.batches:
            case = profile_tower(loaded, tower, batch, args.calls, chain=args.chain)
            report["cases"][f"{tower}@{batch}"] = case
            items = list(case["ops"].items())
            print(f"\n{tower}@{batch}: wall {case['wall_ms_per_forward']:.1f} ms per forward")
            for name, op in items[:args.top]:
                print(f"  {op['ms']:8.2f}  {name} ({op['calls']} calls)")
            rest = sum(op["ms"] for _, op in items[args.top:])
            print(f"  {rest:8.2f}  the other {max(0, len(items) - args.top)} ops")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
