"""Where a packed model's cosine goes: each quantized linear's dequantized weight put into a float
copy of the teacher (float activations), all at once and one at a time.

usage: layer_sensitivity.py PACKED.safetensors"""
import copy, sys, warnings
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[3]))  # benchmarks/
warnings.filterwarnings("ignore")
import torch
torch.set_num_threads(1)
import bench_distill_real as B, pyclipq
from pyclipq.cli.loading import load_model
from pyclipq.nn.linear import QuantLinear, rotate_input_dim

loaded = load_model(f"hf:{B.minilm_path()}")
packed = pyclipq.load(sys.argv[1], copy.deepcopy(loaded.model))
ev = B.Evaluation(loaded)
print("packed (W4A8)", ev(packed), flush=True)
equivalents = {}  # layer name -> the float weight the packed layer computes with, in the original input basis
for name, m in packed.named_modules():
    if isinstance(m, QuantLinear) and not m.layer.is_float:
        assert m.layer.smoothing == "none"
        equivalents[name] = (rotate_input_dim(m.dequantize_weight(torch.float32), m.rotation_block), m.bias)

def with_weights(names):
    model = copy.deepcopy(loaded.model)
    mods = dict(model.named_modules())
    with torch.no_grad():
        for n in names:
            w, b = equivalents[n]
            mods[n].weight.copy_(w)
            if b is not None:
                mods[n].bias.copy_(b.float())
    return model

all_names = sorted(equivalents)
base = ev(with_weights(all_names))
print("all dequantized weights, float activations", base, flush=True)
rows = []
for n in all_names:
    rec = ev(with_weights([x for x in all_names if x != n]))
    rows.append((rec["cos"] - base["cos"], n, rec["cos"]))
    print(f"  {n:60s} float -> {rec['cos']:.5f} ({rec['cos'] - base['cos']:+.5f})", flush=True)
kind = {}
for gain, n, _ in rows:
    kind.setdefault(n.split(".")[-1] if "attention" not in n else n.split(".")[-2] + "." + n.split(".")[-1], []).append(gain)
print("mean gain by kind:", {k: round(sum(v) / len(v), 5) for k, v in kind.items()})
