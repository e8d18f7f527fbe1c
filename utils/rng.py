"""Saving and restoring random-number streams (resume, and replaying a student step exactly)."""
from __future__ import annotations

import random
from contextlib import contextmanager

import numpy as np
import torch


def rng_state(generator: torch.Generator | None = None) -> dict:
    """The global CPU stream, every CUDA device's stream, and `generator`'s, as one picklable dict."""
    state = {"torch": torch.get_rng_state()}
    if generator is not None:
        state["generator"] = generator.get_state()
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict, generator: torch.Generator | None = None) -> None:
    """Put back what `rng_state` captured."""
    torch.set_rng_state(state["torch"])
    if generator is not None:
        generator.set_state(state["generator"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def device_rng_state(device: torch.device) -> tuple:
    """The global CPU stream and the stream of `device` (when it is a CUDA device)."""
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def set_device_rng_state(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


@contextmanager
def global_streams_kept():
    """Run a block that may reseed the global streams (torch on the CPU and every CUDA device, numpy,
    Python's `random`), and put all of them back afterwards, so the block draws nothing from the caller's."""
    python, numpy_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
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
