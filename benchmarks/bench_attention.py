"""The attention core of CLIP's blocks: pyclipq.ops.attention against torch's SDPA, same process, same run.

Cases: B = 1, 8, 32; 12 heads of width 64; T = 50 (ViT-B/32 image tokens, no mask) and T = 77
(text, causal). Both read the packed q | k | v projection output [B, T, 3 E]:
- pyclipq: ``ops.attention(qkv, heads, causal=...)`` -> [B, T, E], what out_proj reads;
- SDPA: ``F.scaled_dot_product_attention`` on the [B, heads, T, 64] views of the same tensor
  (``is_causal=True`` for text: its fastest causal path), timed on its own ("sdpa") and with the
  copy back to [B, T, E] that the unfused block needs ("sdpa+reshape").
The bar is the median over cases of sdpa / pyclipq (SDPA alone: the stricter comparison).

    python benchmarks/bench_attention.py [--threads 2] [--reps 51] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from pyclipq import build_info, ops

CASES = [(b, t, causal) for b in (1, 8, 32) for t, causal in ((50, False), (77, True))]
HEADS, HEAD_DIM = 12, 64


def median_us(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def run_case(batch: int, tokens: int, causal: bool, reps: int) -> dict:
    width = HEADS * HEAD_DIM
    qkv = torch.randn(batch, tokens, 3 * width)
    q, k, v = (t.reshape(batch, tokens, HEADS, HEAD_DIM).transpose(1, 2) for t in qkv.chunk(3, dim=-1))

    def sdpa():
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    def sdpa_reshaped():
        return sdpa().transpose(1, 2).reshape(batch, tokens, width)

    def ours():
        return ops.attention(qkv, HEADS, causal=causal)

    err = (ours() - sdpa_reshaped()).abs().max().item()
    # interleaved rounds: a slow spell of the machine hits every contender alike
    rounds = {"pyclipq": [], "sdpa": [], "sdpa+reshape": []}
    for _ in range(3):
        rounds["pyclipq"].append(median_us(ours, reps))
        rounds["sdpa"].append(median_us(sdpa, reps))
        rounds["sdpa+reshape"].append(median_us(sdpa_reshaped, reps))
    best = {name: min(v) for name, v in rounds.items()}
    return {"batch": batch, "tokens": tokens, "causal": causal, "us": best, "max_abs_err": err,
            "speedup_vs_sdpa": best["sdpa"] / best["pyclipq"],
            "speedup_vs_sdpa_reshape": best["sdpa+reshape"] / best["pyclipq"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=51)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    info = build_info()
    print(f"CPU table {info['cpu_isa']}, {args.threads} threads, torch {torch.__version__}")
    print(f"{'B':>3} {'T':>3} {'causal':>6} {'pyclipq us':>11} {'sdpa us':>9} {'+reshape us':>12} "
          f"{'x sdpa':>7} {'x +reshape':>10} {'max err':>9}")
    results = []
    with torch.inference_mode():
        for batch, tokens, causal in CASES:
            r = run_case(batch, tokens, causal, args.reps)
            results.append(r)
            us = r["us"]
            print(f"{batch:>3} {tokens:>3} {str(causal):>6} {us['pyclipq']:>11.1f} {us['sdpa']:>9.1f} "
                  f"{us['sdpa+reshape']:>12.1f} {r['speedup_vs_sdpa']:>7.2f} {r['speedup_vs_sdpa_reshape']:>10.2f} "
                  f"{r['max_abs_err']:>9.1e}")
    median = statistics.median(r["speedup_vs_sdpa"] for r in results)
    print(f"median speedup vs SDPA: {median:.2f}x (bar: 1.5x); "
          f"vs SDPA + reshape: {statistics.median(r['speedup_vs_sdpa_reshape'] for r in results):.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu_isa": info["cpu_isa"], "threads": args.threads, "cases": results,
                       "median_speedup_vs_sdpa": median}, f, indent=1)


if __name__ == "__main__":
    main()
