"""Distillation losses (directions checked by hand) and the trainer (schedule, resume, logs, errors)."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from pyclipq.train import qat
from pyclipq.train.distill import (
    DistillationLoss,
    contrastive_loss,
    feature_loss,
    kl_teacher_student,
    similarity_kl,
    similarity_logits,
)
from pyclipq.train.trainer import Trainer, TrainConfig, lr_factor

from train_helpers import single_thread, tiny_batch, tiny_clip

_one_thread = pytest.fixture(autouse=True)(single_thread)


def test_kl_direction_is_teacher_to_student_by_hand():
    student = torch.tensor([[2.0, 0.0, -1.0]])
    teacher = torch.tensor([[0.5, 1.5, 0.0]])
    p_s = [math.exp(v) / sum(math.exp(u) for u in student[0].tolist()) for v in student[0].tolist()]
    p_t = [math.exp(v) / sum(math.exp(u) for u in teacher[0].tolist()) for v in teacher[0].tolist()]
    forward = sum(t * math.log(t / s) for t, s in zip(p_t, p_s))  # KL(p_teacher || p_student)
    reverse = sum(s * math.log(s / t) for t, s in zip(p_t, p_s))
    got = kl_teacher_student(student, teacher).item()
    assert got == pytest.approx(forward, rel=1e-6)
    assert abs(forward - reverse) > 1e-2 and got != pytest.approx(reverse, rel=1e-3)
    # tau scaling: tau^2 * KL of the softened distributions.
    tau = 2.0
    p_s2 = F.softmax(student / tau, dim=1)[0].tolist()
    p_t2 = F.softmax(teacher / tau, dim=1)[0].tolist()
    softened = tau**2 * sum(t * math.log(t / s) for t, s in zip(p_t2, p_s2))
    assert kl_teacher_student(student, teacher, tau).item() == pytest.approx(softened, rel=1e-6)


def test_kl_gradient_reaches_the_student_only():
    student = torch.randn(4, 5, requires_grad=True)
    teacher = torch.randn(4, 5, requires_grad=True)
    similarity_kl(student, teacher, 1.5).backward()
    assert student.grad.abs().sum() > 0 and teacher.grad is None
    assert similarity_kl(teacher.detach(), teacher.detach()).item() == pytest.approx(0.0, abs=1e-7)


def test_similarity_kl_averages_both_directions():
    s, t = torch.randn(3, 3), torch.randn(3, 3)
    want = (kl_teacher_student(s, t, dim=1) + kl_teacher_student(s.t(), t.t(), dim=1)) / 2
    assert similarity_kl(s, t).item() == pytest.approx(want.item(), rel=1e-6)


def test_contrastive_loss_by_hand_and_with_positives():
    logits = torch.tensor([[3.0, 1.0], [0.0, 2.0]])
    ce = lambda row, j: -math.log(math.exp(row[j]) / sum(math.exp(v) for v in row))  # noqa: E731
    rows, cols = logits.tolist(), logits.t().tolist()
    want = (ce(rows[0], 0) + ce(rows[1], 1)) / 4 + (ce(cols[0], 0) + ce(cols[1], 1)) / 4
    assert contrastive_loss(logits).item() == pytest.approx(want, rel=1e-6)
    everything = torch.ones(2, 2, dtype=torch.bool)  # both captions describe both images
    soft = lambda row: (ce(row, 0) + ce(row, 1)) / 2  # noqa: E731  (uniform targets over the positives)
    want = (soft(rows[0]) + soft(rows[1])) / 4 + (soft(cols[0]) + soft(cols[1])) / 4
    assert contrastive_loss(logits, everything).item() == pytest.approx(want, rel=1e-6)
    with pytest.raises(ValueError, match="positives must mark at least one"):
        contrastive_loss(logits, torch.tensor([[True, False], [True, False]]))
    with pytest.raises(ValueError, match="square"):
        contrastive_loss(torch.randn(2, 3))


def test_feature_losses_by_hand():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    assert feature_loss(a, b, "cosine").item() == pytest.approx(((1 - 1 / math.sqrt(2)) + 0) / 2, rel=1e-6)
    na, nb = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    assert feature_loss(a, b, "mse").item() == pytest.approx(((na - nb) ** 2).mean().item(), rel=1e-6)
    with pytest.raises(ValueError, match="kind must be one of"):
        feature_loss(a, b, "l1")


def test_distillation_loss_switches_terms():
    g = torch.Generator().manual_seed(0)
    out = lambda: {"image_features": torch.randn(4, 8, generator=g), "text_features": torch.randn(4, 8, generator=g), "logit_scale": 10.0}  # noqa: E731
    student, teacher = out(), out()
    total, parts = DistillationLoss(1.0, 0.5, 2.0, 0.25, "mse")(student, teacher)
    assert set(parts) == {"contrastive", "kd", "feature"}
    assert total.item() == pytest.approx(parts["contrastive"].item() + 0.5 * parts["kd"].item() + 0.25 * parts["feature"].item(), rel=1e-6)
    logits_s = similarity_logits(student["image_features"], student["text_features"], 10.0)
    logits_t = similarity_logits(teacher["image_features"], teacher["text_features"], 10.0)
    assert parts["kd"].item() == pytest.approx(similarity_kl(logits_s, logits_t, 2.0).item(), rel=1e-6)
    total, parts = DistillationLoss(kd_weight=0.0)(student)
    assert set(parts) == {"contrastive"}
    with pytest.raises(ValueError, match="teacher outputs are needed"):
        DistillationLoss()(student)
    with pytest.raises(ValueError, match="at least one of"):
        DistillationLoss(0, 0, 1.0, 0)
    with pytest.raises(ValueError, match="kd_temperature must be > 0"):
        DistillationLoss(kd_temperature=0)
    with pytest.raises(ValueError, match="kd_weight must be a number >= 0"):
        DistillationLoss(kd_weight=-1)


# ---------------------------------------------------------------- trainer


def test_lr_schedule_warms_up_then_follows_the_cosine():
    assert [lr_factor(s, 10, 2) for s in (0, 1)] == [0.5, 1.0]
    assert lr_factor(2, 10, 2) == pytest.approx(1.0)
    assert lr_factor(6, 10, 2) == pytest.approx(0.5)
    assert lr_factor(10, 10, 2, 0.1) == pytest.approx(0.1)


def _data(batches=3, n=6):
    return [tiny_batch(n, seed=i) for i in range(batches)]


def _trainer(out_dir, steps=5, **kwargs):
    student = qat.prepare_qat(tiny_clip().eval(), "ternary-qall")
    config = TrainConfig(steps=steps, lr=2e-3, warmup_steps=1, output_dir=str(out_dir), progress=False, log_every=1, **kwargs)
    return Trainer(student, torch.utils.data.DataLoader(_Pairs(_data(4, 4)), batch_size=4, shuffle=True), config)


class _Pairs(torch.utils.data.Dataset):
    def __init__(self, batches):
        self.items = [(img, tok) for images, tokens in batches for img, tok in zip(images, tokens)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        # A dataset that draws from the global RNG (an augmentation): resume must replay it too.
        image, tokens = self.items[i]
        return image + 0.01 * torch.randn_like(image), tokens


def test_resume_reproduces_the_next_step_loss(tmp_path):
    # 16 pairs, batch 4, shuffled: 4 batches per epoch, so steps 5-6 cross into epoch 2.
    straight = _trainer(tmp_path / "a", steps=7)
    straight.fit()
    interrupted = _trainer(tmp_path / "b", steps=7)
    interrupted.fit(until=5)
    resumed = _trainer(tmp_path / "c", steps=7)
    resumed.load_checkpoint(tmp_path / "b" / "checkpoint.pt")
    assert resumed.position.step == 5
    resumed.fit()
    want = [r["loss"] for r in straight.history[5:]]
    assert [r["loss"] for r in resumed.history] == want
    assert [r["loss"] for r in interrupted.history] == [r["loss"] for r in straight.history[:5]]
    # The JSONL log has one parseable record per logged step.
    records = [json.loads(line) for line in (tmp_path / "a" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 8)) and {"loss", "kd", "contrastive", "lr", "grad_norm"} <= set(records[0])


def test_a_checkpoint_at_the_end_of_an_epoch_resumes_into_the_next(tmp_path):
    """The distributed trainer starts a resumed epoch past its consumed samples (the sampler's
    start_at); a checkpoint after an epoch's last batch must resume with the next epoch's first."""
    from pyclipq.data import train_loader
    from pyclipq.distributed import DistributedContext
    from pyclipq.train.distributed import DistributedTrainer

    def trainer(out, steps=6):
        data = train_loader(_Pairs(_data(4, 4)), 4, lambda items: tuple(torch.stack(x) for x in zip(*items)))
        config = TrainConfig(steps=steps, lr=2e-3, warmup_steps=1, output_dir=str(out), progress=False)
        return DistributedTrainer(qat.prepare_qat(tiny_clip().eval(), "ternary-qall"), data, config,
                                  context=DistributedContext())

    straight = trainer(tmp_path / "a")
    straight.fit()
    interrupted = trainer(tmp_path / "b")
    interrupted.fit(until=4)  # 16 pairs, batch 4: the end of epoch 0
    resumed = trainer(tmp_path / "c")
    resumed.load_checkpoint(tmp_path / "b" / "checkpoint.pt")
    resumed.fit()
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in straight.history[4:]]


def test_qat_with_distillation_lowers_the_loss():
    images, tokens = tiny_batch(8, seed=3)
    positives = (tokens[:, None, :] == tokens[None, :, :]).all(-1)  # repeated captions are positives
    student = qat.prepare_qat(tiny_clip().eval(), "ternary-qall")
    trainer = Trainer(student, [(images, tokens, positives)], TrainConfig(steps=20, lr=3e-3, progress=False))
    history = trainer.fit()
    assert history[-1]["loss"] < 0.9 * history[0]["loss"]
    assert all(r["grad_norm"] > 0 for r in history)


def test_bf16_training_runs():
    student = qat.prepare_qat(tiny_clip().eval(), "ternary-qall", exact=False)
    history = Trainer(student, [tiny_batch(4)], TrainConfig(steps=2, precision="bf16", progress=False)).fit()
    assert all(math.isfinite(r["loss"]) for r in history)


def test_teacher_is_frozen_without_touching_the_callers_model():
    model = tiny_clip().eval()
    student = qat.prepare_qat(model, "int8")
    trainer = Trainer(student, [tiny_batch(2)], TrainConfig(steps=1, progress=False), teacher=model)
    assert all(p.requires_grad for p in model.parameters())
    assert all(not p.requires_grad for p in trainer.teacher.parameters()) and not trainer.teacher.training
    teacher_params = {id(p) for p in trainer.teacher.parameters()}
    assert not teacher_params & {id(p) for p in trainer.params}


def test_trainer_errors(tmp_path):
    student = qat.prepare_qat(tiny_clip().eval(), "int8")
    with pytest.raises(ValueError, match="data must be re-iterable"):
        Trainer(student, iter([tiny_batch(2)]), TrainConfig(steps=1))
    with pytest.raises(ValueError, match="objective needs a teacher"):
        Trainer(student, [tiny_batch(2)], TrainConfig(steps=1), teacher=None)
    with pytest.raises(ValueError, match="not a QAT-prepared model"):
        Trainer(tiny_clip(), [tiny_batch(2)], TrainConfig(steps=1))
    with pytest.raises(ValueError, match="precision must be one of"):
        TrainConfig(precision="fp16")
    with pytest.raises(ValueError, match="warmup_steps"):
        TrainConfig(steps=2, warmup_steps=3)
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        TrainConfig(steps=0)
    trainer = Trainer(student, [(torch.rand(2, 3, 16, 16), torch.rand(2, 12))], TrainConfig(steps=1, progress=False))
    with pytest.raises(ValueError, match="token ids must be an integer tensor"):
        trainer.fit()
    with pytest.raises(FileNotFoundError, match="path: no checkpoint"):
        trainer.load_checkpoint(tmp_path / "missing.pt")
    nan = Trainer(student, [(torch.full((2, 3, 16, 16), float("nan")), tiny_batch(2)[1])], TrainConfig(steps=1, progress=False))
    with pytest.raises(FloatingPointError, match="at step 1"):
        nan.fit()
