"""Running one program over the processes of a `torchrun` launch (torch.distributed: nccl on CUDA, gloo
otherwise): who this process is, splitting independent work, and the few collectives the programs use.

Every function here is also correct in a single process (no process group): it then does no communication."""
from __future__ import annotations

import hashlib
import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

# How long a collective may wait for the slowest process. Generous: rank 0 may be writing a large set, or a
# process may be building a cache, while the others already wait at the next all_reduce.
COLLECTIVE_TIMEOUT = timedelta(hours=2)


@dataclass(frozen=True)
class ProcessGroupInfo:
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def my_share(self, count: int) -> list[int]:
        """The indices in range(count) this process handles (round-robin)."""
        return list(range(self.rank, count, self.world_size))


def init_from_env(device: torch.device) -> ProcessGroupInfo:
    """Join the process group `torchrun` describes (nccl on CUDA, gloo otherwise); single process otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return ProcessGroupInfo()
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", timeout=COLLECTIVE_TIMEOUT)
    return ProcessGroupInfo(dist.get_rank(), dist.get_world_size())


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def main_process_first(group: ProcessGroupInfo):
    """Let rank 0 run the block first (e.g. build shared caches on disk), then the other ranks."""
    if not group.is_main:
        barrier()
    yield
    if group.is_main:
        barrier()


def from_main_process(value, group: ProcessGroupInfo, device: torch.device):
    """Rank 0's `value` on every rank (one decision, even where ranks would judge differently)."""
    if not group.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, device=device)
    return box[0]


def gather_objects(value, group: ProcessGroupInfo) -> list:
    """Every rank's `value` (any picklable object), in rank order, on every rank."""
    if not group.distributed:
        return [value]
    gathered = [None] * group.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def sum_over_ranks(tensors: list[torch.Tensor], group: ProcessGroupInfo) -> list[torch.Tensor]:
    """The element-wise sums of `tensors` over all ranks, with one all_reduce of one flat buffer (the tensors
    must have the same shapes and dtype on every rank)."""
    if not group.distributed:
        return list(tensors)
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    return [part.view_as(t) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


def digest(value) -> str:
    """A SHA-256 of every tensor and number inside `value` (through dicts, lists and tuples), in order."""
    hasher = hashlib.sha256()

    def feed(item) -> None:
        if isinstance(item, torch.Tensor):
            hasher.update(str((item.dtype, tuple(item.shape))).encode())
            hasher.update(item.detach().to("cpu").reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()
                          if item.numel() else b"")
        elif isinstance(item, dict):
            for key in sorted(item, key=str):
                hasher.update(str(key).encode())
                feed(item[key])
        elif isinstance(item, (list, tuple)):
            for element in item:
                feed(element)
        else:
            hasher.update(repr(item).encode())

    feed(value)
    return hasher.hexdigest()


def differing_ranks(value, group: ProcessGroupInfo) -> list[int]:
    """The ranks whose `value` (see `digest`) differs from rank 0's; a collective under torchrun (a single
    process computes nothing)."""
    if not group.distributed:
        return []
    digests = gather_objects(digest(value), group)
    return [rank for rank, other in enumerate(digests) if other != digests[0]]
