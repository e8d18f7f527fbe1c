"""Splitting independent work (experts) over the processes of a `torchrun` launch."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ProcessGroupInfo:
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def my_share(self, count: int) -> list[int]:
        """The indices in range(count) this process handles (round-robin)."""
        return list(range(self.rank, count, self.world_size))


def init_from_env(device: torch.device) -> ProcessGroupInfo:
    """Join the process group `torchrun` describes (nccl on CUDA, gloo otherwise); single process otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return ProcessGroupInfo()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return ProcessGroupInfo(dist.get_rank(), dist.get_world_size())


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
