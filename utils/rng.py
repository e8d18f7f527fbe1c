"""Saving and restoring random-number streams (resume, and replaying a student step exactly)."""
from __future__ import annotations

import random
from contextlib import contextmanager

import numpy as np
import torch


def cuda_devices_in_use() -> list[int]:
    """The CUDA device this process works on (the current one), when CUDA is in use; no other. Under torchrun
    every process sees every GPU, and asking each GPU for its random state would open a CUDA context on it
    from every process (hundreds of MiB each)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return [torch.cuda.current_device()]
    return []


def rng_state(generator: torch.Generator | None = None) -> dict:
    """The global CPU stream, the stream of this process's CUDA device, and `generator`'s, as one picklable dict."""
    state = {"torch": torch.get_rng_state()}
    if generator is not None:
        state["generator"] = generator.get_state()
    devices = cuda_devices_in_use()
    if devices:
        state["cuda"] = {index: torch.cuda.get_rng_state(index) for index in devices}
    return state


def restore_rng(state: dict, generator: torch.Generator | None = None) -> None:
    """Put back what `rng_state` captured (CUDA streams of devices this machine has)."""
    torch.set_rng_state(state["torch"])
    if generator is not None:
        generator.set_state(state["generator"])
    cuda = state.get("cuda")
    if cuda is None or not torch.cuda.is_available():
        return
    # Files written before one device was recorded hold a list of every visible device's stream.
    entries = cuda.items() if isinstance(cuda, dict) else enumerate(cuda)
    for index, device_state in entries:
        if index < torch.cuda.device_count():
            torch.cuda.set_rng_state(device_state, index)


def device_rng_state(device: torch.device) -> tuple:
    """The global CPU stream and the stream of `device` (when it is a CUDA device)."""
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def set_device_rng_state(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


@contextmanager
def global_streams_kept():
    """Run a block that may reseed the global streams (torch on the CPU and this process's CUDA device, numpy,
    Python's `random`), and put all of them back afterwards, so the block draws nothing from the caller's."""
    python, numpy_state = random.getstate(), np.random.get_state()
    devices = cuda_devices_in_use()
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(python)
        np.random.set_state(numpy_state)


@contextmanager
def global_streams_seeded(seed: int, device: torch.device):
    """Run a block with the global CPU stream and `device`'s stream both seeded from `seed`, then put back
    what they were: whatever the block draws (dropout) is fixed by `seed` alone."""
    on_cuda = device.type == "cuda"
    with torch.random.fork_rng(devices=[device] if on_cuda else [], device_type=device.type):
        torch.default_generator.manual_seed(seed)
        if on_cuda:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        yield
