"""A/B of a temporary environment switch on the AVX2 int8 linears: alternating child processes.

usage: python ab_linears.py SWITCH=VALUE SIDE M[,M...] [RUNS]
  SIDE: "base" if the switch turns the change off (PQ_AB_NO_WIDE=1, experiment 1),
        "change" if it turns the change on (PQ_AB_WHOLE_M=128, experiment 2).
Each case's time is the best of 7 samples in a run; the report is the median over RUNS runs.
"""
import json, os, statistics, subprocess, sys

CHILD = r'''
import json, sys, time, torch, pyclipq
sys.path.insert(0, BENCH_DIR)
from shapes import block_linears
from pyclipq.configs import LayerConfig
from pyclipq.nn import QuantLinear
torch.set_num_threads(2)
out = {}
with torch.inference_mode():
    for model in ("ViT-B/32", "text-B"):
        for name, n, k in block_linears(model):
            layer = QuantLinear.from_weight(torch.randn(n, k), torch.randn(n), LayerConfig("int8"))
            for m in MS:
                x = torch.randn(m, k)
                for _ in range(3): layer(x)
                best = 1e9
                for _ in range(7):
                    reps = max(1, int(2e6 // (m * n * k) * 10) // 10 + 1)
                    t = time.perf_counter()
                    for _ in range(reps): layer(x)
                    best = min(best, (time.perf_counter() - t) / reps)
                out[f"{model} {name} {n}x{k} M={m}"] = best
print(json.dumps(out))
'''
switch, side, ms = sys.argv[1], sys.argv[2], sys.argv[3]
runs = int(sys.argv[4]) if len(sys.argv) > 4 else 3
name, value = switch.split("=", 1)
bench_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..")  # benchmarks/
child = CHILD.replace("MS", f"({ms},)").replace("BENCH_DIR", repr(os.path.normpath(bench_dir)))
res = {"base": [], "change": []}
for _ in range(runs):
    for label in ("base", "change"):
        env = dict(os.environ, PYCLIPQ_CPU_ISA="avx2")
        if label == side:
            env[name] = value
        o = subprocess.run([sys.executable, "-c", child], env=env, capture_output=True, text=True, check=True)
        res[label].append(json.loads(o.stdout.strip().splitlines()[-1]))
ratios = []
for case in res["base"][0]:
    b = statistics.median(d[case] for d in res["base"])
    c = statistics.median(d[case] for d in res["change"])
    ratios.append(b / c)
    print(f"{case:40s} base {b * 1e3:8.3f} ms  change {c * 1e3:8.3f} ms  speedup {b / c:5.2f}")
print("median speedup", statistics.median(ratios))
