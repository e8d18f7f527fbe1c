"""Device choice and seeding."""
from __future__ import annotations

import os
import random

import numpy as np
import torch

from utils.errors import SettingError


def available_devices() -> list[str]:
    """The devices this process can use: the CPU, every visible CUDA GPU, Apple's mps."""
    found = ["cpu"]
    if torch.cuda.is_available():
        found += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        found.append("mps")
    return found


def device_problem(requested: str | None) -> str | None:
    """What is wrong with a requested device name on this machine, or None (also for None: the automatic choice)."""
    if not requested:
        return None
    here = f"the devices here are {', '.join(available_devices())}"
    try:
        device = torch.device(requested)
    except (RuntimeError, ValueError):
        return f"is not a device name ({here})"
    if device.type == "cpu" or (device.type == "mps" and "mps" in available_devices()):
        return None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count and (device.index is None or device.index < count):
            return None
        return f"names a CUDA GPU that is not there ({count} visible; {here})"
    return f"is not available ({here})"


def pick_device(requested: str | None = None) -> torch.device:
    """The device `requested` (the device setting) if given (a clear error when this machine has no such device), else this process's CUDA
    device when CUDA is available, else the CPU."""
    if requested:
        problem = device_problem(requested)
        if problem:
            raise SettingError("device", requested, f"{requested} {problem}")
        device = torch.device(requested)
    elif torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    else:
        device = torch.device("cpu")
    if device.type == "cuda":
        # The current device too: random states, collectives and caching allocators then stay on this GPU.
        device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
        torch.cuda.set_device(device)
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
