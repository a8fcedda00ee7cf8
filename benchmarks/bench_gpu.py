"""GPU microbenchmarks of pyclipq's linears at CLIP shapes, against bf16 cuBLAS and torch._int_mm.

Every case is timed as a stack of layers: R calls, each on its own copy of the weights
(and activations), captured in one CUDA graph, with R large enough that the copies
exceed 3x the L2 cache: weights stream from DRAM as in a real forward pass, and the
graph takes the CPU launch cost out. The time per call is
``triton.testing.do_bench(graph.replay, return_mode="median") / R``. Inputs are random
(never zeros). Ratios are bf16 time / method time (> 1: faster than bf16).

Usage: python benchmarks/bench_gpu.py [--out DIR] [--m 1,16,...] [--quick] [--budget-s S]
Writes DIR/bench_gpu.json and prints a table plus the goal summary.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shapes import unique_shapes  # noqa: E402

import pyclipq  # noqa: E402
from pyclipq import formats, ops  # noqa: E402

M_VALUES = (1, 8, 16, 64, 256, 2048, 8192, 16384)
GOALS = {  # (method family, M range, ratio goal vs bf16)
    "int8 at M >= 2048": (("int8_linear",), 2048, 1 << 62, 1.6),
    "ternary/int2 GEMV at M <= 16": (("ternary", "int2"), 1, 16, 4.0),
    "int4 at M <= 64": (("int4",), 1, 64, 2.5),
}


def machine():
    p = torch.cuda.get_device_properties(0)
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        commit = ""
    import triton
    return {"device": p.name, "capability": list(torch.cuda.get_device_capability()), "sms": p.multi_processor_count,
            "l2_bytes": getattr(p, "L2_cache_size", 50 << 20), "torch": torch.__version__, "triton": triton.__version__,
            "pyclipq_build": pyclipq.build_info(), "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "git_commit": commit}


def rand_layer(fmt, n, k, group, device="cuda"):
    packed, scale = formats.random_packed_weight(fmt, n, k, group)
    return packed.to(device), (scale * 0.01).to(device)  # CLIP-sized scales: outputs of a realistic magnitude


def time_stack(make_call, bytes_per_call, l2_bytes, max_calls=400):
    """Median µs per call over a graph of R calls on distinct inputs (R * bytes >= 3 L2)."""
    import triton.testing
    r = max(2, min(max_calls, math.ceil(3 * l2_bytes / max(bytes_per_call, 1))))
    calls = [make_call(i) for i in range(r)]
    calls[0]()
    calls[1]()  # compile / autotune outside the graph
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    ms = triton.testing.do_bench(graph.replay, warmup=10, rep=60, return_mode="median")
    del graph, calls
    return ms * 1000.0 / r


def cases(n, k, m):
    """(method name, factory(i) -> call, bytes per call) for one shape."""
    dev = "cuda"
    x_bytes = m * k * 2

    def bf16(i, w=None):
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16)
        return lambda: torch.matmul(x, w.t())
    yield "bf16", bf16, n * k * 2 + x_bytes

    if m > 16 and k % 8 == 0 and n % 8 == 0:
        def int_mm(i):
            xq = torch.randint(-127, 128, (m, k), dtype=torch.int8, device=dev)
            w = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=dev)
            return lambda: torch._int_mm(xq, w.t())
        yield "int_mm", int_mm, n * k + m * k

    specs = [("int8", 0), ("int4", 128), ("int2", 128), ("ternary", 0)]
    for backend in ("cuda", "triton"):
        for fmt, group in specs:
            def linear(i, fmt=fmt, group=group, backend=backend):
                w, s = rand_layer(fmt, n, k, group)
                x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
                fn = getattr(ops, f"{fmt}_linear")
                args = (w, s, group) if fmt in ("int4", "int2") else (w, s)
                return lambda: fn(x, *args, backend=backend)
            wbytes = n * formats.padded_k(k) * formats.get_format(fmt).bits // 8
            yield f"{fmt}_linear/{backend}", linear, wbytes + x_bytes

        def gemm(i, backend=backend):
            w, _ = rand_layer("int8", n, k, 0)
            xq = torch.randint(-127, 128, (m, formats.padded_k(k)), dtype=torch.int8, device=dev)
            return lambda: ops.int8_gemm(xq, w, backend=backend)
        yield f"int8_gemm/{backend}", gemm, n * k + m * k

    if m <= 16:
        from pyclipq.ops import triton as T
        for fmt, group in specs[1:]:
            def weight_only(i, fmt=fmt, group=group):
                w, s = rand_layer(fmt, n, k, group)
                x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
                return lambda: T.weight_only_linear(fmt, x, w, s, group)
            wbytes = n * formats.padded_k(k) * formats.get_format(fmt).bits // 8
            yield f"{fmt}_weight_only/triton", weight_only, wbytes + x_bytes


def summarize(rows):
    out = {}
    for goal, (families, lo, hi, target) in GOALS.items():
        best = {}
        for r in rows:
            if not (lo <= r["m"] <= hi) or r["method"] == "bf16" or r["ratio"] is None:
                continue
            if not any(r["method"].startswith(f) for f in families):
                continue
            key = (r["n"], r["k"], r["m"], r["method"].split("/")[0].split("_")[0])
            best[key] = max(best.get(key, 0.0), r["ratio"])
        ratios = list(best.values())
        if ratios:
            out[goal] = {"goal": target, "cases": len(ratios), "geomean": math.exp(statistics.fmean(map(math.log, ratios))),
                         "min": min(ratios), "max": max(ratios), "met_in": sum(r >= target for r in ratios)}
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "results/gpu"))
    ap.add_argument("--m", default=",".join(map(str, M_VALUES)))
    ap.add_argument("--quick", action="store_true", help="3 shapes, 4 M values")
    ap.add_argument("--budget-s", type=float, default=420.0, help="stop measuring after this long")
    args = ap.parse_args()
    torch.manual_seed(0)
    info = machine()
    m_values = [int(v) for v in args.m.split(",")]
    shapes = unique_shapes()
    if args.quick:
        shapes = dict(list(shapes.items())[:3])
        m_values = [1, 16, 64, 4096]
    # Goal-relevant cases first, so a budget cut keeps them.
    order = sorted(((s, m) for s in shapes for m in m_values), key=lambda sm: (sm[1] not in (1, 16, 64, 2048, 16384), sm[1]))
    rows, t0 = [], time.time()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    for (n, k), m in order:
        if time.time() - t0 > args.budget_s:
            print(f"budget reached: skipping the remaining cases from N={n} K={k} M={m}")
            break
        base = None
        for name, factory, nbytes in cases(n, k, m):
            try:
                us = time_stack(factory, nbytes, info["l2_bytes"])
                err = None
            except Exception as e:  # record and go on: one failing method must not hide the others
                us, err = None, f"{type(e).__name__}: {str(e)[:200]}"
            if name == "bf16":
                base = us
            ratio = base / us if (base and us) else None
            rows.append({"n": n, "k": k, "m": m, "layers": shapes[(n, k)], "method": name, "us": us,
                         "ratio": ratio, "error": err})
            print(f"N={n:5d} K={k:5d} M={m:6d} {name:26s} "
                  + (f"{us:9.2f} us  x{ratio:5.2f}" if us and ratio else f"{us} {err or ''}"), flush=True)
            torch.cuda.empty_cache()
        with open(Path(args.out) / "bench_gpu.json", "w") as f:
            json.dump({"machine": info, "rows": rows, "summary": summarize(rows)}, f, indent=1)
    summary = summarize(rows)
    print("\nGoals (best backend per case, ratio = bf16 time / pyclipq time):")
    for goal, s in summary.items():
        print(f"  {goal:32s} goal {s['goal']:.1f}x: geomean {s['geomean']:.2f}x, min {s['min']:.2f}x, "
              f"max {s['max']:.2f}x, met in {s['met_in']}/{s['cases']}")
    print(f"device: {info['device']}  date: {info['date_utc']}  torch {info['torch']}  triton {info['triton']}")


if __name__ == "__main__":
    main()
