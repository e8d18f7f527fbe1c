"""Peak-memory measurement for benchmarks that run each configuration in a fresh process.

Two measures: the bytes that tensors hold (`utils.tensor_memory.TensorPeak`: exact, the one the
benchmarks judge by) and the resident set of the process (what the machine sees; noisy, tens of MiB
between runs of the same code, from the allocator's caching and lazily loaded libraries)."""
from __future__ import annotations

import resource


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


class PeakRss:
    """Peak resident set inside the block above its level at entry (`.host_mb` after it)."""

    def __enter__(self):
        reset_peak_rss()
        self._base = current_rss_mb()
        self.host_mb = 0.0
        return self

    def __exit__(self, *exc):
        self.host_mb = peak_rss_mb() - self._base
        return False
