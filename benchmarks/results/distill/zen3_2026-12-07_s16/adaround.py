"""AdaRound-style learned rounding as the last phase of distillation QAT (an ad-hoc probe, not in the
library): does choosing each weight's rounding with a relaxed, annealed variable beat the
straight-through estimator's last steps?

usage: adaround.py ROUND_STEPS LAMBDA V_LR INIT [bench_distill_real.py arguments, --steps = all steps]

The recipe (recipes.distill) trains `--steps` - ROUND_STEPS straight-through steps on its own
warm-up + cosine schedule. Then every trainable fake-quant weight's scale is fixed (its learned
scale, or the format rule's of the latent as it is), and its level becomes floor(t) + h(V) in the
level grid, h the rectified sigmoid of a new variable V started at the latent's fractional
position (INIT "latent": the phase starts from the latent float model, as AdaRound starts from
the float weights) or at +-V0 on the side of the latent's nearest level (INIT "hard:V0": the
phase starts next to the straight-through model, h = 0.88 / 0.12 for V0 = 1.5). ROUND_STEPS steps of Adam (lr V_LR,
constant) train V alone on the same distillation loss + LAMBDA x loss0 x mean(1 - |2h - 1|^beta),
beta falling from 20 to 2 after a fifth of the phase without the term (Nagel et al., 2020). The
hard levels (h >= 0.5) are written back into the latents, so that convert_qat packs them, and the
benchmark evaluates and saves the packed model as for any run.
"""
import dataclasses
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # benchmarks/
warnings.filterwarnings("ignore")
import torch
import torch.nn.functional as F

import bench_distill_real as B
from pyclipq.nn.linear import rotate_input_dim
from pyclipq.primitives import format_scales
from pyclipq.train import qat, recipes
from pyclipq.train.fake_quant import FakeQuantLinear, _FakeQuantActivation
from pyclipq.train.trainer import to_device

ROUND_STEPS, LAMBDA, V_LR, INIT = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
ZETA, GAMMA = 1.1, -0.1
WARM = 0.2
SOFT = {"on": True}  # EncoderDistillation puts the student in eval mode: a flag of our own says soft or hard


def rectified_sigmoid(v):
    return (torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)


def per_weight(scale, k, group_size):
    return scale[:, None].expand(-1, k) if scale.dim() == 1 else scale.repeat_interleave(group_size, dim=1)[:, :k]


class SoftRounding:
    def __init__(self, m: FakeQuantLinear):
        fmt, layer = m.layer.spec, m.layer
        self.group_size = layer.group_size if fmt.grouped else 0
        w = m.stored_weight().detach().float()
        learned = m.learned_scale()
        self.learned = learned is not None
        self.scale = learned.detach().float() if learned is not None else format_scales(w, fmt, self.group_size, layer.threshold_rule)
        self.expanded = per_weight(self.scale, w.shape[1], self.group_size)
        self.mul, self.qmax = fmt.level_mul, fmt.qmax
        self.top = 2 * fmt.qmax // fmt.level_mul  # the level grid's last index
        t = (w / self.expanded + self.qmax) / self.mul
        self.base = t.floor().clamp(0, self.top - 1)
        frac = (t - self.base).clamp(0.0, 1.0)
        if INIT == "latent":
            self.v = torch.nn.Parameter(-torch.log((ZETA - GAMMA) / (frac.clamp(1e-4, 1 - 1e-4) - GAMMA) - 1))
        else:
            self.v = torch.nn.Parameter(torch.where(frac >= 0.5, 1.0, -1.0) * float(INIT.split(":")[1]))
        self.rule = fmt.threshold_rule and not self.learned
        if not self.learned and not self.rule:
            raise SystemExit(f"{layer.format}: only learned scales or ternary's rule can be written back exactly")

    def h(self):
        return rectified_sigmoid(self.v) if SOFT["on"] else (self.v >= 0).float()

    def levels(self, hard=False):
        h = (self.v >= 0).float() if hard else self.h()
        return self.mul * (self.base + h) - self.qmax

    def weight(self):
        return self.levels() * self.expanded


def soft_linear(self, x, rows):
    assert rows is None
    x = rotate_input_dim(x, self.rotation_block)
    return F.linear(_FakeQuantActivation.apply(x, self.act_scale), self._soft.weight(), self.bias)


@torch.no_grad()
def write_back(m: FakeQuantLinear):
    s = m._soft
    levels = s.levels(hard=True)
    stored = levels * s.expanded
    if s.rule:  # ternary's absmean: scale the row so that mean|w| is the fixed scale again
        share = levels.abs().mean(dim=1, keepdim=True).clamp_min(1e-12)
        stored = stored / share
    m.weight.copy_(rotate_input_dim(stored.to(m.weight.dtype), m.rotation_block))
    del m._linear, m._soft
    qw = m.quantized_weight()
    k = levels.shape[1]
    assert torch.equal(qw.levels[:, :k], levels), "written-back latent does not give the chosen levels"
    assert torch.allclose(qw.scale, s.scale, rtol=1e-5, atol=0), "written-back latent does not give the fixed scale"


real_distill = recipes.distill


def distill_then_round(model, data, config, *, train, loss, evaluate, **kwargs):
    total = train.steps
    result = real_distill(model, data, config, train=dataclasses.replace(train, steps=total - ROUND_STEPS), loss=loss,
                          evaluate=evaluate, **kwargs)
    student, trainer = result.student, result.trainer
    layers = qat.quantized_weights(student)
    assert all(isinstance(m, FakeQuantLinear) for m in layers)
    for m in layers:
        m._soft = SoftRounding(m)
        m._linear = soft_linear.__get__(m)
    frozen = [p for p in student.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    variables = [m._soft.v for m in layers]
    count = sum(v.numel() for v in variables)
    optimizer = torch.optim.Adam(variables, lr=V_LR)
    objective = recipes.EncoderDistillation(loss)
    seconds = result.evaluations[-1]["seconds"]

    def record(tag, seconds):
        with torch.no_grad():
            rec = dict(evaluate(student.eval(), trainer.position.step))
        undecided = sum(((rectified_sigmoid(v) > 0.0) & (rectified_sigmoid(v) < 1.0)).sum().item() for v in variables) / count
        changed = sum((m._soft.levels(hard=True) != ref[i]).sum().item() for i, m in enumerate(layers)) / count
        print(f"    [{tag}] undecided {undecided:.3f}, levels changed from round-to-nearest {changed:.4f}", flush=True)
        result.evaluations.append({"step": trainer.position.step, "seconds": round(seconds, 2), "phase": tag,
                                   "undecided": round(undecided, 4), "changed": round(changed, 5), **rec})

    ref = [m._soft.levels(hard=True).clone() for m in layers]  # round-to-nearest at the fixed scales
    SOFT["on"] = True
    print("  soft (the latent float weights, clipped to their cells):", flush=True)
    record("soft start", seconds)
    SOFT["on"] = False
    batches = trainer._batches()
    loss0 = None
    started = time.perf_counter()
    for i in range(ROUND_STEPS):
        SOFT["on"] = True
        batch = to_device(next(batches), trainer.device)
        task, _ = objective(student, trainer.teacher, batch)
        if loss0 is None:
            loss0 = float(task.detach())
        progress = i / ROUND_STEPS
        if progress < WARM:
            reg = torch.zeros(())
        else:
            beta = 2 + (20 - 2) * (1 - (progress - WARM) / (1 - WARM))
            reg = sum((1 - (2 * rectified_sigmoid(v) - 1).abs().pow(beta)).sum() for v in variables) / count
        total_loss = task + LAMBDA * loss0 * reg
        optimizer.zero_grad(set_to_none=True)
        total_loss.backward()
        optimizer.step()
        trainer.position.step += 1
        if (i + 1) % 25 == 0:
            print(f"    round step {i + 1}: task {float(task):.5f} reg {float(reg):.4f} "
                  f"({(time.perf_counter() - started) / (i + 1):.2f} s/step)", flush=True)
        if (i + 1) % 50 == 0 and i + 1 < ROUND_STEPS:
            SOFT["on"] = False
            paused = time.perf_counter()
            record("hard", seconds + paused - started)
            started += time.perf_counter() - paused  # evaluations are not training time
    seconds += time.perf_counter() - started
    SOFT["on"] = True
    record("soft end", seconds)
    SOFT["on"] = False
    record("hard end", seconds)
    for m in layers:
        write_back(m)
    for p in frozen:
        p.requires_grad_(True)
    trainer.config.steps = trainer.position.step
    result.quantized = qat.convert_qat(student.cpu()).eval()
    return result


B.distill = distill_then_round
if __name__ == "__main__":
    raise SystemExit(B.main(sys.argv[5:]))
