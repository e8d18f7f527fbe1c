"""The peak memory that tensors hold inside a block of code, counted in bytes rather than read off the process.

The resident set of a process also moves with the allocator's caching, the page cache and libraries
loading lazily, so two runs of the same code can differ by tens of MiB. The bytes of live tensors
do not: on a GPU the CUDA allocator counts them (`torch.cuda.max_memory_allocated`); on the CPU the
torch profiler records every allocation and free with its size (`profile_memory=True`), and the
peak is the highest running total of those sizes.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.profiler import ProfilerActivity, profile


def running_peak(changes: Iterable[int]) -> int:
    """Highest running total of signed allocation sizes, starting from 0 (never below 0)."""
    level = peak = 0
    for change in changes:
        level += change
        peak = max(peak, level)
    return peak


class TensorPeak:
    """Peak bytes held by tensors on `device` inside the block, above the level at entry (`.bytes` after it).

    On the CPU a tensor that existed before the block and is freed inside it is not subtracted (the
    profiler does not know its size), so there the figure can err high, never low.
    """

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.bytes = 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self._profiler.__enter__()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            self._profiler.__exit__(*exc)
            events = [e for e in self._profiler.profiler.kineto_results.events()
                      if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
            self.bytes = running_peak(e.nbytes() for e in sorted(events, key=lambda e: e.start_ns()))
        return False

    @property
    def mib(self) -> float:
        return self.bytes / 2**20
