"""Proxy: learnable per-input-channel smoothing in the learned-scale fake-quant path (not exported)."""
import os, sys
import torch
from torch import nn
sys.path.insert(0, "/work/main/benchmarks")
from pyclipq.train import fake_quant as fq
from pyclipq.nn.linear import rotate_input_dim

MODE = os.environ.get("SMOOTH", "before")  # before | after | none

orig_reset = fq.FakeQuantLinear.reset_scales_

def reset(self):
    if MODE != "none" and getattr(self, "log_smooth", None) is None:
        self.log_smooth = nn.Parameter(torch.zeros(self.in_features, device=self.weight.device))
    orig_reset(self)

def stored_weight(self):
    s = getattr(self, "log_smooth", None)
    w = self.weight
    if s is not None and MODE == "before":
        w = w * s.exp()
    w = rotate_input_dim(w, self.rotation_block)
    if s is not None and MODE == "after":
        w = w * s.exp()
    return w

def lsl(self, x, rows):
    s = getattr(self, "log_smooth", None)
    weight, bias, scale = self.stored_weight(), self.bias, self.learned_scale()
    if s is not None and MODE == "before":
        x = x / s.exp()
    x = rotate_input_dim(x, self.rotation_block)
    if s is not None and MODE == "after":
        x = x / s.exp()
    if rows is not None:
        weight, bias, scale = weight[rows], (bias[rows] if bias is not None else None), scale[rows]
    w_fq = fq.learnable_fake_quantize(weight, self.layer.spec, scale, self.layer.group_size).to(x.dtype)
    return torch.nn.functional.linear(fq._FakeQuantActivation.apply(x, self._act_scale()), w_fq, bias)

fq.FakeQuantLinear.reset_scales_ = reset
fq.FakeQuantLinear.stored_weight = stored_weight
fq.FakeQuantLinear._learned_scale_linear = lsl

import bench_distill_real
sys.exit(bench_distill_real.main())
