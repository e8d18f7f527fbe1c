"""Peak-memory measurement for benchmarks that run each configuration in a fresh process."""
from __future__ import annotations

import resource

import torch


def current_rss_mb() -> float:
    """Resident set size of this process now (Linux /proc), in MiB."""
    with open("/proc/self/statm") as statm:
        pages = int(statm.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def reset_peak_rss() -> None:
    """Restart the kernel's high-water mark of this process's resident set (Linux: clear_refs 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        pass  # then the peak counts from process start: run each configuration in a fresh process


def peak_rss_mb() -> float:
    """Highest resident set size since the last reset (VmHWM), in MiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class PeakMemory:
    """Peak extra memory used inside the block: host RSS above the level at entry, and CUDA peak allocation."""

    def __init__(self, device: torch.device):
        self.device = device
        self.host_mb = self.cuda_mb = 0.0

    def __enter__(self):
        reset_peak_rss()
        self._base = current_rss_mb()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._cuda_base = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc):
        self.host_mb = peak_rss_mb() - self._base
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.cuda_mb = (torch.cuda.max_memory_allocated(self.device) - self._cuda_base) / 2**20
        return False
