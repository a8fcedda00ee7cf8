"""Training: QAT with straight-through estimators, distillation, and the TernaryCLIP and P4Q recipes.

- fake_quant: FakeQuantLinear / FakeQuantParameter (the kernels' math, STE); attention is pyclipq.nn's with
  fake-quant projections (fake_quant_multihead_attention)
- qat: prepare_qat(model, config) -> fake-quant model; convert_qat(model) -> packed model; compare_layers
- distill: contrastive, tau-scaled KL(teacher || student), feature losses; DistillationLoss
- trainer: Trainer + TrainConfig (AdamW, warm-up + cosine, clipping, bf16, checkpoint/resume, JSONL log)
- distributed: init_distributed (torchrun / file rendezvous), GlobalBatch (all-gather with gradients),
  DistributedTrainer (DDP, rank-0 logs and checkpoints, per-rank resume)
- data: the user's data from disk (CSV pairs, webdataset shards, ImageFolder) with counted skips of bad images
- prompt, p4q: CoOp-style PromptLearner, QAdapter, P4QModel, P4QObjective
- recipes: ternary_clip(...) and p4q(...) one-call recipes, and their command line
"""
from .distill import DistillationLoss
from .fake_quant import FakeQuantLinear, FakeQuantParameter
from .qat import compare_layers, convert_qat, differentiable_twin, prepare_qat, strip
from ..distributed import init_distributed
from .distributed import DistributedTrainer
from .trainer import CLIPDistillation, TrainConfig, Trainer

__all__ = [
    "CLIPDistillation",
    "DistillationLoss",
    "DistributedTrainer",
    "FakeQuantLinear",
    "FakeQuantParameter",
    "TrainConfig",
    "Trainer",
    "compare_layers",
    "convert_qat",
    "differentiable_twin",
    "init_distributed",
    "prepare_qat",
    "strip",
]
