"""Experiment: freeze a trained int4 model's codes, fine-tune scales, biases and LayerNorms by distillation."""
import argparse, copy, sys, time, types, warnings
from pathlib import Path
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[3]))  # benchmarks/
import torch
import torch.nn.functional as F
import bench_distill_real as B
import pyclipq
from pyclipq.cli.loading import load_model
from pyclipq.nn import QuantLinear
from pyclipq.nn.packed import unpack_codes
from pyclipq.nn.linear import rotate_input_dim
from pyclipq.train.qat import latent_from_packed
from pyclipq.train.fake_quant import FakeQuantLinear, _FakeQuantActivation
from pyclipq.primitives import dequantize_levels
from pyclipq.train import TrainConfig
from pyclipq.train.recipes import freeze_float_embeddings_
from pyclipq.train.trainer import EncoderDistillation, Trainer
from train_texts import mixed_texts

p = argparse.ArgumentParser()
p.add_argument("--packed", required=True); p.add_argument("--format", default="int4")
p.add_argument("--steps", type=int, default=300); p.add_argument("--lr", type=float, default=1e-4)
p.add_argument("--batch-size", type=int, default=32); p.add_argument("--threads", type=int, default=1)
p.add_argument("--train", default="scales,bias,norm")
p.add_argument("--eval-every", type=int, default=100)
a = p.parse_args()
warnings.filterwarnings("ignore")
torch.set_num_threads(a.threads); torch.manual_seed(0)
loaded = load_model(f"hf:{B.minilm_path()}")
texts = mixed_texts(20000, 0, list(B.DEFAULT_CORPORA))
ns = argparse.Namespace(texts=20000, seed=0, corpus=list(B.DEFAULT_CORPORA), rotation="auto")
ev = B.Evaluation(loaded, domains=B.domain_texts(texts, ns, set(B.evaluation_sentences())))
packed = pyclipq.load(a.packed, copy.deepcopy(loaded.model))
print("packed", ev(packed), flush=True)
config = B.format_config(a.format, ns)
latent = latent_from_packed(loaded.model, packed)
student = pyclipq.prepare_qat(latent, config, exact=False, learn_scales=True)
qls = {n: m for n, m in packed.named_modules() if isinstance(m, QuantLinear) and not m.layer.is_float}
fqs = {n: m for n, m in student.named_modules() if isinstance(m, FakeQuantLinear)}
assert set(qls) == set(fqs), (sorted(qls)[:3], sorted(fqs)[:3])

def frozen_linear(self, x, rows):
    assert rows is None
    x = rotate_input_dim(x, self.rotation_block)
    w = dequantize_levels(self.levels, self.log_scale.exp(), self.in_features).to(x.dtype)
    return F.linear(_FakeQuantActivation.apply(x, None), w, self.bias)

for n, fq in fqs.items():
    q = qls[n]
    fq.levels = q.layer.spec.level(unpack_codes(q.packed_weight, q.layer.format)).to(torch.float32)
    with torch.no_grad():
        fq.log_scale.copy_(q.weight_scale.to(torch.float32).log())
    fq.weight.requires_grad_(False)
    fq._learned_scale_linear = types.MethodType(frozen_linear, fq)
    if "scales" not in a.train: fq.log_scale.requires_grad_(False)
    if "bias" not in a.train and fq.bias is not None: fq.bias.requires_grad_(False)
freeze_float_embeddings_(student)
for n, prm in student.named_parameters():
    if prm.requires_grad and prm.ndim == 1 and "norm" in n.lower() and "norm" not in a.train:
        prm.requires_grad_(False)
print("trainable", sum(p.numel() for p in student.parameters() if p.requires_grad), flush=True)
with torch.no_grad():
    print("student step 0", ev(student.eval()), flush=True)
data = B.text_batches(loaded, texts, a.batch_size, 0, True)
train = TrainConfig(steps=a.steps, lr=a.lr, warmup_steps=min(50, a.steps // 10), weight_decay=0.0, progress=False, seed=0)
tr = Trainer(student, data, train, teacher=loaded.model, objective=EncoderDistillation(B.distillation_loss(argparse.Namespace(
    embedding_weight=1.0, hidden_weight=3.0, hidden_blocks="all", keep_padding=False, attention_weight=1.0))))
t0 = time.perf_counter()
while tr.position.step < a.steps:
    tr.fit(until=min(a.steps, tr.position.step + a.eval_every))
    student.eval()
    with torch.no_grad():
        print(f"step {tr.position.step} {time.perf_counter()-t0:.0f}s", ev(student), flush=True)
    student.train()
