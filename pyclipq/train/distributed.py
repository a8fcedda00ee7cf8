"""Training on several processes with torch.distributed: torchrun on one or many machines, GPUs or CPUs.

- `pyclipq.distributed` joins the process group (`init_distributed`), shared with batch embedding.
- `GlobalBatch` gathers features from every rank with gradients
  (torch.distributed.nn.functional.all_gather, whose backward sums each rank's gradient
  back to its owner), so the contrastive loss of every rank is the loss of the *global*
  batch, every other rank's pairs included as negatives.
- `DistributedTrainer` is the Trainer under DistributedDataParallel: the frozen teacher
  on every rank, rank-0 logging and checkpoints, and a resume that restores the model,
  the optimizers, the schedulers, and each rank's position in the data and RNG state.

Why one process equals N processes: every rank computes the same global loss L from the
gathered features, so the gathered gradient reaching rank r's own features is N dL/dF_r;
DDP then averages the parameter gradients over the N ranks, which leaves exactly dL/dθ,
the gradient of one process that sees the whole global batch.
"""
from __future__ import annotations

import dataclasses
import warnings

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..data import ResumableDistributedSampler
from ..distributed import DistributedContext, barrier
from .trainer import CLIPDistillation, Trainer, _Position


class GlobalBatch:
    """Gathers each rank's rows into the global batch, in rank order (see the module doc)."""

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """[sum of every rank's n, ...]; gradients flow back to each rank's own rows.

        Ranks may hold different row counts (a bad image left out of one batch): rows are
        padded to the largest count for the collective and the padding is cut off again.
        """
        counts = self._counts(x.shape[0], x.device)
        longest = max(counts)
        padded = x if x.shape[0] == longest else torch.cat([x, x.new_zeros(longest - x.shape[0], *x.shape[1:])])
        with warnings.catch_warnings():
            # torch 2.14 marks the public autograd all_gather deprecated in favour of a private
            # module's; the public one (open_clip's gather_with_grad) is kept until that is public
            warnings.simplefilter("ignore", FutureWarning)
            parts = dist_nn.all_gather(padded)
        return torch.cat([part[:n] for part, n in zip(parts, counts)])

    def positives(self, positives: torch.Tensor) -> torch.Tensor:
        """Each rank's [n_r, n_r] positives on the diagonal of the global matrix; pairs of two ranks are negatives."""
        blocks = [None] * dist.get_world_size()
        dist.all_gather_object(blocks, positives.cpu())
        return torch.block_diag(*blocks).to(positives.device)

    @staticmethod
    def _counts(n: int, device: torch.device) -> list[int]:
        counts = [torch.zeros((), dtype=torch.long, device=device) for _ in range(dist.get_world_size())]
        dist.all_gather(counts, torch.tensor(n, device=device))
        return [int(c) for c in counts]


class _ObjectiveModule(nn.Module):
    """The student and one objective evaluation as one forward(), the call DistributedDataParallel wraps.

    The teacher is kept outside the module tree: it is frozen and already the same on every rank.
    """

    def __init__(self, student: nn.Module, objective, teacher: nn.Module | None):
        super().__init__()
        self.student = student
        self.objective = objective
        self._teacher = [teacher]

    def forward(self, batch):
        return self.objective(self.student, self._teacher[0], batch)


class DistributedTrainer(Trainer):
    """Trainer on every rank of a process group (see the module doc); a plain Trainer on one process.

    data: this rank's batches (pyclipq.data.train_loader / webdataset_pairs); a
    CLIPDistillation objective is made to gather the global batch. find_unused_parameters:
    pass True when some trainable parameters get no gradient in a step.
    """

    def __init__(self, student: nn.Module, data, config, *, context: DistributedContext, teacher="auto",
                 objective=None, optimizers=None, find_unused_parameters: bool = False):
        if not isinstance(context, DistributedContext):
            raise ValueError(f"context must be a DistributedContext (init_distributed()), got {type(context).__name__}")
        self.context = context
        if context.is_distributed:
            if objective is None:
                objective = CLIPDistillation(gather=GlobalBatch())
            elif isinstance(objective, CLIPDistillation) and objective.gather is None:
                objective = CLIPDistillation(objective.loss, gather=GlobalBatch())
        config = dataclasses.replace(config, device=str(context.device), progress=config.progress and context.is_main)
        super().__init__(student, data, config, teacher=teacher, objective=objective, optimizers=optimizers)
        self.module = _ObjectiveModule(self.student, self.objective, self.teacher)
        if context.is_distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.module = DistributedDataParallel(self.module, device_ids=ids,
                                                  find_unused_parameters=find_unused_parameters)

    def compute_loss(self, batch):
        return self.module(batch)

    # ------------------------------------------------------------ data

    def _epoch_iterator(self, epoch: int, skip: int):
        sampler = getattr(self.data, "sampler", None)
        if skip and isinstance(sampler, ResumableDistributedSampler):
            # start the epoch past the consumed samples instead of reading and dropping them
            sampler.start_at(skip * self.data.batch_size)
            return super()._epoch_iterator(epoch, 0)
        return super()._epoch_iterator(epoch, skip)

    # ------------------------------------------------------------ checkpoints

    def _each_rank(self, value):
        if not self.context.is_distributed:
            return [value]
        values = [None] * self.context.world_size
        dist.all_gather_object(values, value)
        return values

    def state_dict(self) -> dict:
        # Ranks differ only in their RNG and (for streamed data) their place in it.
        state = super().state_dict()
        state["ranks"] = self._each_rank({
            "position": dataclasses.asdict(self.position),
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        })
        return state

    def save_checkpoint(self, path=None):
        """Every rank calls it (the RNG states are gathered); rank 0 writes; all return after the write."""
        state = self.state_dict()
        written = self.write_checkpoint(state, path) if self.context.is_main else None
        barrier()
        return written if written is not None else (path or self.checkpoint_path())

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        ranks = state.get("ranks")
        if ranks is None:
            return
        if len(ranks) != self.context.world_size:
            warnings.warn(f"resuming a {len(ranks)}-process checkpoint on {self.context.world_size} processes: the model, "
                          "optimizers and schedulers are restored, the data order and RNG streams start afresh", stacklevel=2)
            self._resume_rng = None
            return
        mine = ranks[self.context.rank]
        self.position = _Position(**mine["position"])
        self._resume_rng = (mine["rng"], mine["cuda_rng"])

    def _log(self, record: dict) -> None:
        if self.context.is_main:
            super()._log(record)
