"""Device choice and seeding."""
from __future__ import annotations

import os
import random

import numpy as np
import torch


def pick_device(requested: str | None = None) -> torch.device:
    """`--device` if given, else this process's CUDA device when CUDA is available, else the CPU."""
    if requested:
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
