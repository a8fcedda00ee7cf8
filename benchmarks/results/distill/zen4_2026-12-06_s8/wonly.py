import sys, dataclasses, torch
sys.path.insert(0, "/work/main/benchmarks")
import bench_distill_real as b
import pyclipq
from pyclipq.cli.loading import load_model
from pyclipq.nn import QuantLinear
torch.set_num_threads(1)
path = b.minilm_path()
loaded = load_model(f"hf:{path}")
ev = b.Evaluation(loaded)
m = pyclipq.load(sys.argv[1], load_model(f"hf:{path}").model)
print("W+A8:", ev(m))
for q in m.modules():
    if isinstance(q, QuantLinear):
        q.layer = dataclasses.replace(q.layer, activation="none")
print("weight-only:", ev(m))
