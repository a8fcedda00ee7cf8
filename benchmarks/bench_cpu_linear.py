"""CPU fused-linear benchmark: pyclipq's int8 / int4 / int2 / ternary against torch's int8, bf16 and fp32.

Every contender returns fp32 (bf16 for bf16) and runs in this process, in the same run, with the
same thread count (torch.set_num_threads, default 2):

* fp32: ``F.linear`` (MKL/oneDNN sgemm);
* bf16: ``F.linear`` on bf16 weights, bias and activations (oneDNN; AMX-BF16 where the CPU has
  it). The bf16 copy of the activations is made once, outside the timed call: a user who runs a
  bf16 model feeds it bf16;
* qd: ``torch.ao.quantization.quantize_dynamic`` Linear packed with engine "x86" (FBGEMM,
  7-bit activations), through its op ``quantized.linear_dynamic``;
* qd_onednn: the same Linear packed with engine "onednn" (oneDNN; AMX-INT8 where the CPU has
  it), skipped with the reason when this torch lacks the engine. FBGEMM has no AMX path, so on
  an AMX CPU this is torch's strong int8 peer; "best torch int8" is the faster of qd and
  qd_onednn on each shape;
* pyclipq: the forward of a ``pyclipq.nn.QuantLinear`` (dynamic per-token int8 activations,
  each format's default group size), the module a converted model calls; its time includes
  the activation quantization, like qd's.

The other contenders get the same fp32 activations. Shapes come from benchmarks/shapes.py
(the four Linears of a ViT-B/32 block and of the text tower), each at M in {1, 50, 77, 400,
1600}. A timing sample is a loop of calls long enough to last >= 20 ms; contenders take turns
sample by sample so that load from other processes hits all of them alike; the result is the
median of the samples after warm-up. Throughput ratios are time(peer) / time(pyclipq) (> 1:
pyclipq is faster); a low-bit format is also compared with pyclipq int8. Everything runs under
torch.inference_mode(), as a deployed model does: outside it, torch's boxed autograd fallback
for custom ops adds ~7 us to every pyclipq call (measured), which matters at M = 1.

The memory-bound case runs M = 1 through a stack of distinct layers (ViT-B/32 blocks) large
enough that every contender's weights, even ternary's 2 bits, exceed the 32 MiB L3, and
reports each contender's effective weight-read bandwidth.

The goals checked are those of the kernel table that ran (GOALS). A quick check of the AMX
table's bars (20 s on 2 threads here):
    python benchmarks/bench_cpu_linear.py --models ViT-B/32 --m 50,400,1600 --stack-blocks 0

Usage: python benchmarks/bench_cpu_linear.py [--threads 2] [--reps 7] [--m 1,50,...]
       [--formats int8,...] [--models ViT-B/32,text-B] [--stack-blocks 24] [--out DIR] [--quick]
Writes DIR/bench_cpu_linear.json (default results/) and prints the tables and the goals.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shapes import block_linears  # noqa: E402

import pyclipq  # noqa: E402
from pyclipq.configs import LayerConfig  # noqa: E402
from pyclipq.nn import QuantLinear  # noqa: E402

FORMATS = ("int8", "int4", "int2", "ternary")
M_VALUES = (1, 50, 77, 400, 1600)
MODELS = ("ViT-B/32", "text-B")
L3_BYTES = 32 << 20
# quantize_dynamic's contenders: name -> the torch.backends.quantized engine that packs its weight
QD_PEERS = {"qd": "x86", "qd_onednn": "onednn"}
# What each pyclipq format's throughput is compared with: time(peer) / time(format).
# "best_int8" is the faster of the qd peers on each shape; "int8" is pyclipq's own int8.
RATIO_PEERS = ("qd", "best_int8", "bf16", "fp32", "int8")
PEER_LABELS = {"qd": "FBGEMM qd", "qd_onednn": "oneDNN qd", "best_int8": "best torch int8", "bf16": "bf16",
               "fp32": "fp32", "int8": "pyclipq int8"}
PEER_SHORT = {"qd": "qd", "qd_onednn": "onednn", "best_int8": "best8", "bf16": "bf16", "fp32": "fp32", "int8": "int8"}


class ShapeSet(NamedTuple):
    """The shapes a table's bars take the median over."""
    label: str
    selects: Callable[[dict], bool]


M_GE_50 = ShapeSet("the M >= 50 shapes", lambda r: r["M"] >= 50)
VIT_B32_M = ShapeSet("the ViT-B/32 shapes at M in {50, 400, 1600}",
                     lambda r: r["model"] == "ViT-B/32" and r["M"] in (50, 400, 1600))
GOAL_VS_FP32 = 2.0
# The issues' bars per kernel table: (format, peer, goal) = median of time(peer) / time(format) over
# `shapes` >= goal, and the M = 1 memory-bound stack's. With VNNI FBGEMM's int8 runs on the same
# vpdpbusd roofline as ours, so the AVX-512 bars are closer to 1; without it our small-code int16
# trick is the edge. With AMX, FBGEMM has no AMX path and oneDNN's int8 and bf16 are the peers to
# beat; every format runs on the same int8 tiles, so the low-bit ones are held to int8's speed.
GOALS = {
    "amx": {"shapes": VIT_B32_M,
            "bars": [("int8", "best_int8", 1.5), ("int8", "bf16", 1.5),
                     ("int4", "int8", 0.9), ("int2", "int8", 0.9), ("ternary", "int8", 0.9)],
            "memory_bound": []},
    "avx512_vnni": {"shapes": M_GE_50,
                    "bars": [bar for f, goal in {"int8": 1.1, "int4": 1.1, "int2": 1.1, "ternary": 1.2}.items()
                             for bar in ((f, "qd", goal), (f, "fp32", GOAL_VS_FP32))],
                    "memory_bound": [("ternary", "fp32", 20.0), ("ternary", "qd", 3.0), ("int8", "qd", 1.0)]},
    "avx2": {"shapes": M_GE_50,
             "bars": [bar for f, goal in {"int8": 1.0, "int4": 1.3, "int2": 1.7, "ternary": 1.7}.items()
                      for bar in ((f, "qd", goal), (f, "fp32", GOAL_VS_FP32))],
             "memory_bound": [("ternary", "fp32", 14.0), ("int8", "qd", 1.0)]},
}


def goals_for(isa: str) -> dict:
    """The bars of the table that ran (the scalar table has none: it is the portable fallback)."""
    return GOALS.get(isa, {"shapes": M_GE_50, "bars": [], "memory_bound": []})


def qd_peers() -> dict:
    """The QD_PEERS this torch has an engine for; a line says why any other is skipped."""
    supported = torch.backends.quantized.supported_engines
    for name, engine in QD_PEERS.items():
        if engine not in supported:
            print(f"skipping {name}: engine {engine!r} is not in torch.backends.quantized.supported_engines "
                  f"{supported}")
    return {name: engine for name, engine in QD_PEERS.items() if engine in supported}


def machine(threads: int, qd: dict) -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--", "csrc", "benchmarks"], capture_output=True,
                                    text=True, cwd=Path(__file__).parent).stdout.strip())
    except OSError:
        commit, dirty = "", None
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(line.split(":", 1)[1].split() for line in f if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = []
    simd = sorted(f for f in flags if f.startswith(("avx", "fma", "f16c", "bmi", "amx")))
    return {"cpu": cpu, "cpu_simd_flags": simd, "logical_cpus": os.cpu_count(), "threads": threads, "torch": torch.__version__,
            "quantized_engines": qd, "supported_quantized_engines": list(torch.backends.quantized.supported_engines),
            "pyclipq_build": pyclipq.build_info(),
            "git_commit": commit, "git_dirty_csrc_or_benchmarks": dirty,
            "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "loadavg_start": os.getloadavg(), "inference_mode": True}


# ---------------------------------------------------------------- contenders

class Contender(NamedTuple):
    fn: Callable[[torch.Tensor], torch.Tensor]
    weight_bytes: int  # what one call reads of the weight (and its scales)
    dtype: torch.dtype  # of the activations it is fed


def qd_packed(w: torch.Tensor, b: torch.Tensor, engine: str):
    """quantize_dynamic's packed weight of a Linear (qint8, per-tensor), packed by `engine`.

    Only packing needs the engine: quantized.linear_dynamic runs the packed object's own
    apply_dynamic (FBGEMM's or oneDNN's), whatever engine is set at call time (checked: the
    same outputs and speed either way). The caller's engine is restored.
    """
    lin = torch.nn.Linear(w.shape[1], w.shape[0])
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(b)
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            q = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear}, dtype=torch.qint8)
    finally:
        torch.backends.quantized.engine = previous
    return q[0]._packed_params._packed_params


def contenders(w: torch.Tensor, b: torch.Tensor, fmts, qd: dict) -> dict[str, Contender]:
    """{name: Contender} of the float peers, the qd peers of `qd` (qd_peers) and each format, for one layer."""
    w16, b16 = w.bfloat16(), b.bfloat16()
    out = {"fp32": Contender(lambda x: F.linear(x, w, b), w.numel() * 4, torch.float32),
           "bf16": Contender(lambda x: F.linear(x, w16, b16), w.numel() * 2, torch.bfloat16)}
    for name, engine in qd.items():
        packed = qd_packed(w, b, engine)
        # reduce_range=True: what torch's dynamic Linear module passes
        out[name] = Contender(lambda x, p=packed: torch.ops.quantized.linear_dynamic(x, p, True), w.numel(),
                              torch.float32)
    for fmt in fmts:
        # The deployed layer, as pyclipq.convert builds it: its forward is what a model calls.
        layer = QuantLinear.from_weight(w, b, LayerConfig(fmt))
        out[fmt] = Contender(layer, layer.weight_nbytes(), torch.float32)
    return out


# ---------------------------------------------------------------- timing

def calls_per_sample(fn, target_s=0.02) -> int:
    t0 = time.perf_counter()
    fn()
    dt = max(time.perf_counter() - t0, 1e-7)
    return max(1, min(10000, int(target_s / dt)))


def time_round_robin(fns: dict, reps: int, warmup: int = 2) -> dict:
    """{name: median seconds per call}; samples alternate between contenders."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    loops = {name: calls_per_sample(fn) for name, fn in fns.items()}
    samples = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            n = loops[name]
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            samples[name].append((time.perf_counter() - t0) / n)
    return {name: statistics.median(v) for name, v in samples.items()}


def ratios(t: dict, fmts, qd: dict) -> dict:
    """{peer: {format: time(peer) / time(format)}} for the RATIO_PEERS that ran, then each qd peer."""
    peers = {name: t[name] for name in ("bf16", "fp32", *qd)}
    if qd:
        peers["best_int8"] = min(t[name] for name in qd)
    if "int8" in fmts:
        peers["int8"] = t["int8"]
    order = [p for p in RATIO_PEERS if p in peers] + [p for p in qd if p not in RATIO_PEERS]
    return {peer: {f: peers[peer] / t[f] for f in fmts} for peer in order}


# ---------------------------------------------------------------- cases

def run_shapes(fmts, m_values, reps, models, qd: dict):
    rows = []
    torch.manual_seed(0)
    for model in models:
        for layer, n, k in block_linears(model):
            w = torch.randn(n, k) / k ** 0.5
            b = torch.randn(n) * 0.1
            cs = contenders(w, b, fmts, qd)
            for m in m_values:
                x = torch.randn(m, k)
                xs = {torch.float32: x, torch.bfloat16: x.bfloat16()}  # converted here, not in the timed call
                t = time_round_robin({name: (lambda c=c: c.fn(xs[c.dtype])) for name, c in cs.items()}, reps)
                row = {"model": model, "layer": layer, "N": n, "K": k, "M": m, "seconds": t,
                       "gops": {name: 2 * m * n * k / s / 1e9 for name, s in t.items()}, "vs": ratios(t, fmts, qd)}
                rows.append(row)
                print(f"{model:8s} {layer:8s} N={n:5d} K={k:5d} M={m:5d} | GOP/s " +
                      " ".join(f"{name} {g:.0f}" for name, g in row["gops"].items()), flush=True)
    return rows


def run_memory_bound(fmts, blocks, reps, qd: dict):
    """M = 1 through a stack of distinct ViT-B/32 blocks: every layer's weights come from DRAM."""
    torch.manual_seed(1)
    layers = []
    for _ in range(blocks):
        for _, n, k in block_linears("ViT-B/32"):
            w = torch.randn(n, k) / k ** 0.5
            layers.append((k, contenders(w, torch.randn(n) * 0.1, fmts, qd)))
    xs = {k: {torch.float32: x, torch.bfloat16: x.bfloat16()} for k, x in ((k, torch.randn(1, k)) for k, _ in layers)}
    names = list(layers[0][1])
    nbytes = {name: sum(cs[name].weight_bytes for _, cs in layers) for name in names}

    def stack(name):
        def run():
            for k, cs in layers:
                c = cs[name]
                c.fn(xs[k][c.dtype])
        return run

    t = time_round_robin({name: stack(name) for name in names}, reps, warmup=1)
    res = {"layers": len(layers), "fp32_weight_bytes": nbytes["fp32"], "seconds": t, "weight_bytes": nbytes,
           "weight_gb_per_s": {name: nbytes[name] / t[name] / 1e9 for name in names},
           "speedup_vs_fp32": {name: t["fp32"] / t[name] for name in names}}
    if "qd" in t:
        res["speedup_vs_qd"] = {name: t["qd"] / t[name] for name in names}
    print(f"\nM=1 memory-bound stack: {len(layers)} layers, {nbytes['fp32'] / 2**20:.0f} MiB fp32 "
          f"(L3 {L3_BYTES >> 20} MiB)")
    for name in names:
        vs_qd = f"  {res['speedup_vs_qd'][name]:5.2f}x qd" if "qd" in t else ""
        print(f"  {name:9s} {t[name] * 1e3:8.2f} ms  {nbytes[name] / 2**20:7.1f} MiB  "
              f"{res['weight_gb_per_s'][name]:5.1f} GB/s  {res['speedup_vs_fp32'][name]:5.2f}x fp32{vs_qd}")
    return res


def summarize(rows, fmts, memory_bound, isa):
    """Each format's median ratio to every peer over the table's shapes, and its bars."""
    goals = goals_for(isa)
    chosen = [r for r in rows if goals["shapes"].selects(r)]
    summary = {"shapes": goals["shapes"].label, "shapes_measured": len(chosen), "formats": {}, "bars": []}
    for f in fmts:
        peers = [p for p in (chosen[0]["vs"] if chosen else ()) if p != f]
        summary["formats"][f] = {p: {"median": statistics.median(r["vs"][p][f] for r in chosen),
                                     "worst": min(r["vs"][p][f] for r in chosen)} for p in peers}
    for f, peer, goal in goals["bars"]:
        if f not in fmts:
            continue
        got = summary["formats"][f].get(peer)
        # a bar whose peer did not run (a missing engine, int8 left out) is reported, never met
        summary["bars"].append({"format": f, "peer": peer, "goal": goal,
                                "median": got["median"] if got else math.nan,
                                "worst": got["worst"] if got else math.nan,
                                "met": bool(got) and got["median"] >= goal})
    if memory_bound:
        for f, peer, goal in goals["memory_bound"]:
            if f in fmts and peer in memory_bound["seconds"]:
                got = memory_bound["seconds"][peer] / memory_bound["seconds"][f]
                summary[f"memory_bound_{f}_vs_{peer}"] = {"ratio": got, "goal": goal, "met": got >= goal}
    return summary


def print_table(rows, fmts, peers, title):
    """A column group per format, a column per peer: time(peer) / time(format) on each shape."""
    if not fmts or not peers:
        return
    width = max(6, *(len(PEER_SHORT[p]) + 1 for p in peers))
    group = width * len(peers)
    print(f"\n{title} (> 1: the format is faster), per shape:")
    print(f"{'':34s}" + " |".join(f"{f:^{group}s}" for f in fmts))
    print(f"{'shape':28s} {'M':>5s}" + " |".join("".join(f"{PEER_SHORT[p]:>{width}s}" for p in peers) for f in fmts))
    for r in rows:
        shape = f"{r['model']} {r['layer']} {r['N']}x{r['K']}"
        print(f"{shape:28s} {r['M']:5d}" +
              " |".join("".join(f"{r['vs'][p][f]:{width}.2f}" for p in peers) for f in fmts))


def print_summary(summary, fmts, isa):
    print(f"\nMedian over {summary['shapes']} ({summary['shapes_measured']} measured), "
          "time(peer) / time(format), worst shape in brackets:")
    for f in fmts:
        print(f"  {f:8s} " + "  ".join(f"{s['median']:5.2f}x {PEER_LABELS.get(p, p)} [{s['worst']:.2f}]"
                                      for p, s in summary["formats"][f].items()))
    memory_bound = {key: s for key, s in summary.items() if key.startswith("memory_bound")}
    if not summary["bars"] and not memory_bound:
        print(f"\nThe {isa} table has no goals for these formats.")
        return
    print(f"\nGoals of the {isa} table:")
    if summary["bars"] and not summary["shapes_measured"]:
        print(f"  not measured: none of {summary['shapes']} ran")
    for bar in summary["bars"] if summary["shapes_measured"] else ():
        peer = PEER_LABELS.get(bar["peer"], bar["peer"])
        if math.isnan(bar["median"]):
            print(f"  {bar['format']:8s} vs {peer} (goal {bar['goal']}x): not measured, {peer} did not run")
            continue
        print(f"  {bar['format']:8s} {bar['median']:5.2f}x {peer} "
              f"(goal {bar['goal']}x, worst shape {bar['worst']:.2f}x)  {'MET' if bar['met'] else 'MISSED'}")
    for key, s in memory_bound.items():
        print(f"  {key}: {s['ratio']:.2f}x (goal {s['goal']}x) {'MET' if s['met'] else 'MISSED'}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=7, help="timing samples per contender (median), >= 5")
    ap.add_argument("--m", default=",".join(map(str, M_VALUES)))
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--stack-blocks", type=int, default=24,
                    help="ViT-B/32 blocks in the M=1 memory-bound stack (24: 680 MB fp32, 42 MB ternary); 0 skips")
    ap.add_argument("--out", default="results")
    ap.add_argument("--quick", action="store_true", help="3 samples, M in {1, 50, 400}, 6-block stack")
    args = ap.parse_args()
    if args.quick:
        args.reps, args.m, args.stack_blocks = 3, "1,50,400", min(args.stack_blocks, 6)
    torch.set_num_threads(args.threads)
    fmts = [f for f in args.formats.split(",") if f]
    qd = qd_peers()
    info = machine(args.threads, qd)
    print(f"{info['cpu']} ({' '.join(info['cpu_simd_flags'])}) | {args.threads} threads (pyclipq ops run on {info['pyclipq_build']['cpu_threads']}) | "
          f"torch {info['torch']} | pyclipq ISA {info['pyclipq_build']['cpu_isa']} | load {info['loadavg_start']}")
    if info["pyclipq_build"]["cpu_threads"] != args.threads:
        print("WARNING: pyclipq's CPU ops do not run on the requested threads; rebuild (see README)")
    with torch.inference_mode():
        rows = run_shapes(fmts, [int(m) for m in args.m.split(",")], args.reps, args.models.split(","), qd)
        memory_bound = run_memory_bound(fmts, args.stack_blocks, args.reps, qd) if args.stack_blocks > 0 else None
    info["loadavg_end"] = os.getloadavg()
    isa = info["pyclipq_build"]["cpu_isa"]
    summary = summarize(rows, fmts, memory_bound, isa)
    print_table(rows, fmts, [p for p in ("qd", "best_int8", "bf16", "fp32") if p in rows[0]["vs"]],
                "Throughput ratios pyclipq / peer")
    low_bit = [f for f in fmts if f != "int8"]
    print_table(rows, low_bit if "int8" in fmts else [], ["int8"], "Throughput ratios format / pyclipq int8")
    print_summary(summary, fmts, isa)
    print(f"load average: start {info['loadavg_start']}, end {info['loadavg_end']}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "bench_cpu_linear.json", "w") as f:
        json.dump({"machine": info, "args": vars(args), "rows": rows, "memory_bound": memory_bound,
                   "summary": summary}, f, indent=1)
    print(f"wrote {out / 'bench_cpu_linear.json'}")


if __name__ == "__main__":
    main()
