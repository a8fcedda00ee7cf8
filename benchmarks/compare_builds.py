"""Two builds of pyclipq side by side on one forced CPU table: does a change slow a table down?

Each run is a child process that imports pyclipq from one build (the installed one, or a
directory given with --base, e.g. `pip install --no-build-isolation --no-deps --target DIR .`
from a checkout of the base commit), forces a table with PYCLIPQ_CPU_ISA (read once per process)
and times the fused linears of the ViT-B/32 block shapes (QuantLinear forward, fp32 in and out,
under inference_mode). Runs alternate base / change, --runs times each, so that drift of the
machine's speed hits both alike. A run's time for a case is its fastest of 7 samples (a sample
that the host stalled says nothing about the code); the report is the median of that over runs,
and the ratio change / base per case and its median (1.00: no change).

Usage: python benchmarks/compare_builds.py --base DIR [--isa avx512_vnni,avx2] [--runs 5]
       [--m 1,50,400] [--formats int8,ternary,int4] [--threads 2] [--out results]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, statistics, sys, time
import torch
import pyclipq
from pyclipq.configs import LayerConfig
from pyclipq.nn import QuantLinear
sys.path.insert(0, {bench_dir!r})
from shapes import block_linears
torch.set_num_threads({threads})
assert pyclipq.build_info()["cpu_isa"] == {isa!r}, pyclipq.build_info()
times = {{}}
with torch.inference_mode():
    for name, n, k in block_linears("ViT-B/32"):
        w = torch.randn(n, k)
        for fmt in {formats!r}:
            layer = QuantLinear.from_weight(w, torch.randn(n), LayerConfig(fmt))
            for m in {m_values!r}:
                x = torch.randn(m, k)
                layer(x)
                t0 = time.perf_counter(); layer(x); once = time.perf_counter() - t0
                calls = max(1, int(0.02 / max(once, 1e-6)))
                samples = []
                for _ in range(7):
                    t0 = time.perf_counter()
                    for _ in range(calls):
                        layer(x)
                    samples.append((time.perf_counter() - t0) / calls)
                # the fastest sample: a sample that a descheduled vCPU stalled (these VMs lose
                # 8-16 ms at a time to the host) says nothing about the code
                times[f"{{name}} {{n}}x{{k}} {{fmt}} M={{m}}"] = min(samples)
print(json.dumps({{"file": pyclipq.__file__, "times": times}}))
"""


def run_child(pythonpath: str | None, isa: str, args) -> dict:
    env = {**os.environ, "PYCLIPQ_CPU_ISA": isa}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath + os.pathsep + env.get("PYTHONPATH", "")
    code = CHILD.format(bench_dir=str(Path(__file__).resolve().parent), threads=args.threads, isa=isa,
                        formats=args.formats.split(","), m_values=[int(v) for v in args.m.split(",")])
    # cwd="/": the source tree's pyclipq/ must not shadow the build under test
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd="/", timeout=3600)
    if r.returncode != 0:
        raise SystemExit(f"child ({isa}, {pythonpath or 'installed'}) failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="directory holding the base build's pyclipq package")
    ap.add_argument("--isa", default="avx512_vnni,avx2")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--m", default="1,50,400")
    ap.add_argument("--formats", default="int8,ternary,int4")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="results")
    args = ap.parse_args()
    if not (Path(args.base) / "pyclipq").is_dir():
        raise SystemExit(f"--base must be a directory holding a built pyclipq package, got {args.base!r}")
    if args.runs < 5:
        raise SystemExit(f"--runs must be >= 5 (medians of interleaved runs), got {args.runs}")
    report = {}
    for isa in args.isa.split(","):
        runs = {"base": [], "change": []}
        for _ in range(args.runs):
            runs["base"].append(run_child(args.base, isa, args)["times"])
            runs["change"].append(run_child(None, isa, args)["times"])
        cases = list(runs["base"][0])
        med = {side: {c: statistics.median(r[c] for r in runs[side]) for c in cases} for side in runs}
        ratios = {c: med["change"][c] / med["base"][c] for c in cases}
        print(f"\n{isa}: time change / base, median of {args.runs} interleaved runs each ({args.threads} threads)")
        for c in cases:
            print(f"  {c:40s} base {med['base'][c] * 1e6:9.1f} us  change {med['change'][c] * 1e6:9.1f} us  "
                  f"ratio {ratios[c]:.3f}")
        overall = statistics.median(ratios.values())
        print(f"  median ratio {overall:.3f} (min {min(ratios.values()):.3f}, max {max(ratios.values()):.3f})")
        report[isa] = {"median_s": med, "ratio": ratios, "median_ratio": overall}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare_builds.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
