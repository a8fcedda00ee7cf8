"""bench_distill_real.py with an oscillation-dampening term (Nagel et al. 2022) added to the loss:
lambda(t) * mean over quantized linears of mean((W/s - level(W/s))^2), W the stored (rotated) latent,
s its (learned or rule) scale, detached; lambda ramps up as a cosine from 0 to DAMPEN over the run."""
import math, os, sys
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[3]))  # benchmarks/
import torch
import bench_distill_real as B
import pyclipq.train.recipes as R
from pyclipq.train.trainer import EncoderDistillation
from pyclipq.train.fake_quant import FakeQuantLinear
from pyclipq.primitives import format_scales, nearest_levels
from pyclipq import formats

LAMBDA = float(os.environ["DAMPEN"])
state = {"calls": 0, "total": None}
orig_budget = R.budget_steps
def budget(*a, **k):
    n = orig_budget(*a, **k); state["total"] = n; print("dampen: total steps", n, flush=True); return n
R.budget_steps = budget
orig_call = EncoderDistillation.__call__

def term(student):
    parts = []
    for m in student.modules():
        if not isinstance(m, FakeQuantLinear) or m.layer.is_float:
            continue
        w = m.stored_weight().float()
        spec, gs = m.layer.spec, m.layer.group_size if m.layer.spec.grouped else 0
        s = m.learned_scale() if m.log_scale is not None else format_scales(w, spec, gs, m.layer.threshold_rule)
        s = s.detach()
        n, k = w.shape
        if spec.grouped:
            kp = formats.padded_k(k); g = s.shape[1]
            r = torch.nn.functional.pad(w, (0, kp - k)).view(n, g, kp // g) / s[:, :, None]
        else:
            r = w / s[:, None]
        lv = nearest_levels(r.detach(), spec)
        parts.append(((r - lv) ** 2).mean())
    return torch.stack(parts).mean()

def patched(self, student, teacher, batch):
    loss, info = orig_call(self, student, teacher, batch)
    state["calls"] += 1
    total = state["total"] or 10**9
    lam = LAMBDA * 0.5 * (1 - math.cos(math.pi * min(1.0, state["calls"] / total)))
    if lam > 0:
        d = term(student)
        loss = loss + lam * d
        info = dict(info); info["dampen"] = d.detach()
    if state["calls"] % 100 == 0:
        print(f"dampen: step {state['calls']} lambda {lam:.3g} loss {float(loss):.4g} term {float(term(student)):.4f}", flush=True)
    return loss, info
EncoderDistillation.__call__ = patched
if __name__ == "__main__":
    raise SystemExit(B.main())
