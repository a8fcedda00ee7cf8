"""torch.distributed helpers shared by training and batch embedding: join the process group
torchrun describes (or one given by an ``init_method``), leave it, wait for every rank.

`init_distributed` joins the group that torchrun describes in the environment (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT: ``env://``), or one given by an ``init_method``
(``file://`` in the tests). NCCL on GPUs, gloo on the CPU. Without either it returns a
one-process context and creates no group.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1 and dist.is_initialized()


def world() -> tuple[int, int]:
    """(rank, world size) of the initialized process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


def init_distributed(device: str = "auto", *, init_method: str | None = None, rank: int | None = None,
                     world_size: int | None = None, backend: str | None = None) -> DistributedContext:
    """Join (or create) the process group; returns this process's rank, world size and device.

    device: "auto" = this process's GPU (cuda:LOCAL_RANK) when CUDA is available, else the CPU;
    "cpu" or "cuda" force one. backend: None = NCCL on GPUs, gloo on the CPU.
    """
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda under torch.distributed, got {device!r}")
    joined = dist.is_available() and dist.is_initialized()  # by the caller, or an earlier call
    if joined:
        rank, world_size = dist.get_rank(), dist.get_world_size()
    rank = _env_int("RANK", 0) if rank is None else rank
    world_size = _env_int("WORLD_SIZE", 1) if world_size is None else world_size
    # without torchrun's variables (spawned test processes) every rank is taken to be on this machine
    local_rank = _env_int("LOCAL_RANK", rank if (init_method or joined) else 0)
    local_world_size = _env_int("LOCAL_WORLD_SIZE", world_size if (init_method or joined) else 1)
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("--device cuda: CUDA is not available on this machine")
    if use_cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        target = torch.device("cuda", torch.cuda.current_device())
    else:
        target = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if use_cuda else "gloo"), init_method=init_method or "env://",
                                rank=rank, world_size=world_size, device_id=target if use_cuda else None)
    return DistributedContext(rank, world_size, local_rank, local_world_size, target)


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
