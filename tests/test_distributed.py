"""Training on 2 gloo processes (torch.multiprocessing + a file:// rendezvous) equals 1 process, and resumes exactly."""
from __future__ import annotations

import torch
import torch.multiprocessing as mp
import torchvision.transforms as T
from PIL import Image

from pyclipq.train import TrainConfig, qat
from pyclipq.data import CaptionPairs, PairCollate, train_loader
from pyclipq.train.distill import DistillationLoss
from pyclipq.distributed import DistributedContext, init_distributed, shutdown_distributed
from pyclipq.train.distributed import DistributedTrainer
from pyclipq.train.trainer import CLIPDistillation
from train_helpers import CLASSNAMES, tiny_clip, tiny_tokenizer

GLOBAL_BATCH = 8
STEPS = 6  # 32 pairs = 4 global batches an epoch: the run crosses into a second epoch
STOP = 3  # the interrupted run checkpoints mid-epoch


def write_pairs(folder, n: int = 32, seed: int = 0):
    """n PNG images (a class colour plus noise) and a CSV of their captions."""
    g = torch.Generator().manual_seed(seed)
    rows = ["image,caption"]
    for i in range(n):
        label = int(torch.randint(len(CLASSNAMES), (1,), generator=g))
        pixels = (torch.rand(16, 16, 3, generator=g) * 80).to(torch.uint8)
        pixels[..., label % 3] += 150
        Image.fromarray(pixels.numpy()).save(folder / f"{i:03d}.png")
        rows.append(f"{i:03d}.png,a photo of a {CLASSNAMES[label]}.")
    (folder / "pairs.csv").write_text("\n".join(rows) + "\n")
    return folder / "pairs.csv"


def train(context: DistributedContext, csv, out, *, until: int | None = None, resume: bool = False) -> dict:
    """Ternary QAT + KD of the tiny CLIP on the CSV; returns the student's state after `until` steps."""
    teacher = tiny_clip(0)
    student = qat.prepare_qat(teacher, "ternary-qall")
    data = train_loader(CaptionPairs.from_csv(csv, T.ToTensor()), GLOBAL_BATCH, PairCollate(tiny_tokenizer()), seed=3)
    config = TrainConfig(steps=STEPS, lr=1e-3, warmup_steps=1, progress=False, output_dir=str(out), log_every=1)
    objective = CLIPDistillation(DistillationLoss(contrastive_weight=1.0, kd_weight=1.0, feature_weight=1.0))
    trainer = DistributedTrainer(student, data, config, context=context, teacher=teacher, objective=objective)
    if resume:
        trainer.load_checkpoint()
    trainer.fit(until)
    return {k: v.detach().clone() for k, v in student.state_dict().items()}


def _ranks(rank: int, world: int, store: str, csv, out):
    torch.set_num_threads(1)
    context = init_distributed("cpu", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        whole = train(context, csv, out / "whole")
        train(context, csv, out / "halves", until=STOP)
        resumed = train(context, csv, out / "halves", resume=True)
    finally:
        shutdown_distributed()
    if rank == 0:
        torch.save({"whole": whole, "resumed": resumed}, out / "result.pt")


def test_two_gloo_ranks_equal_one_process_and_resume_exactly(tmp_path):
    csv = write_pairs(tmp_path)
    mp.spawn(_ranks, args=(2, str(tmp_path / "store"), csv, tmp_path), nprocs=2, join=True)
    result = torch.load(tmp_path / "result.pt", weights_only=True)
    single = train(DistributedContext(), csv, tmp_path / "single")

    # The same global batches (DistributedSampler: the 2 ranks' halves are the 1-process batch) and a
    # loss defined on the global batch: DDP's averaged gradient is the 1-process gradient. What is
    # left is float summation order, amplified at most lr/eps by AdamW over 6 steps.
    for name, value in single.items():
        if value.is_floating_point():
            torch.testing.assert_close(result["whole"][name], value, rtol=0, atol=1e-5, msg=name)
    # Resuming mid-epoch on 2 ranks replays the uninterrupted 2-rank run exactly.
    for name, value in result["whole"].items():
        assert torch.equal(result["resumed"][name], value), name
    logs = (tmp_path / "whole" / "train_log.jsonl").read_text().splitlines()
    assert len(logs) == STEPS  # rank 0 alone writes the log


def _distill_ranks(rank: int, world: int, store: str, csv, out, progressive=None):
    """Label-free distillation QAT (recipes.distill, with the dampening term, whose gradient joins the
    forward's outside DistributedDataParallel's forward, and progressive quantization when asked) on
    2 gloo ranks: each rank saves its student and its weights' final blends."""
    from pyclipq.train.qat import quantized_weights
    from pyclipq.train.recipes import distill

    torch.set_num_threads(1)
    context = init_distributed("cpu", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        data = train_loader(CaptionPairs.from_csv(csv, T.ToTensor()), GLOBAL_BATCH, PairCollate(tiny_tokenizer()), seed=3)
        config = TrainConfig(steps=STEPS, lr=3e-3, warmup_steps=1, progress=False, output_dir=str(out), log_every=1)
        result = distill(tiny_clip(0), data, "int2", init="ptq", calibration_batches=2, train=config,
                         distributed=context, dampen=1.0, progressive=progressive, progressive_fraction=0.5)
    finally:
        shutdown_distributed()
    torch.save({"student": result.student.state_dict(), "history": result.history,
                "blends": [w.blend for w in quantized_weights(result.student)]}, out / f"rank{rank}.pt")


def test_distillation_runs_on_two_gloo_ranks_with_replicas_in_step(tmp_path):
    csv = write_pairs(tmp_path)
    runs = {}
    for progressive in (None, "bottom-up"):
        out = tmp_path / str(progressive)
        out.mkdir()
        mp.spawn(_distill_ranks, args=(2, str(out / "store"), csv, out, progressive), nprocs=2, join=True)
        runs[progressive] = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for progressive, ranks in runs.items():
        # DDP starts every replica from rank 0's weights (each rank calibrated its own PTQ start on its
        # own batches) and averages the gradients: the replicas stay identical, blended steps included
        for name, value in ranks[0]["student"].items():
            assert torch.equal(ranks[1]["student"][name], value), (progressive, name)
        losses = [r["loss"] for r in ranks[0]["history"]]
        assert len(losses) == STEPS and "grid_distance" in ranks[0]["history"][-1]
        assert len(ranks[0]["blends"]) > 0 and all(b == 1.0 for r in ranks for b in r["blends"])
    plain, progressive = runs[None][0], runs["bottom-up"][0]
    assert plain["history"][-1]["loss"] < plain["history"][0]["loss"]
    # the progressive run's first step ran the float latents, and its training went another way
    assert progressive["history"][0]["loss"] != plain["history"][0]["loss"]
    assert any(not torch.equal(progressive["student"][name], value) for name, value in plain["student"].items())


def _budget_ranks(rank: int, world: int, store: str, out):
    """recipes.budget_steps on 2 gloo ranks that spent different times at different paces."""
    from pyclipq.train.recipes import budget_steps

    context = init_distributed("cpu", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        steps = budget_steps(60.0, spent_s=10.0 + rank, pace_s=0.5 if rank == 0 else 0.4, done=30, distributed=context)
    finally:
        shutdown_distributed()
    (out / f"budget{rank}.txt").write_text(str(steps))


def test_a_time_budget_gives_every_rank_the_same_step_count(tmp_path):
    """The largest time spent (11 s) and the slowest pace (0.5 s) on both ranks: 30 + 49 / 0.5 = 128
    steps (rank 1 alone would say 30 + 49 / 0.4 = 152, rank 0 alone 130): a rank that stepped once
    more than the others would hang DistributedDataParallel."""
    mp.spawn(_budget_ranks, args=(2, str(tmp_path / "store"), tmp_path), nprocs=2, join=True)
    assert [int((tmp_path / f"budget{r}.txt").read_text()) for r in range(2)] == [128, 128]
