"""Seed, device, logging and progress (every program)."""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

from settings.base import Settings, setting
from settings.choices import WANDB_MODES
from utils.cli import UserError


def check_seed(value) -> str | None:
    return None if 0 <= value < 2**63 else "must be a whole number from 0 to 2**63 - 1"


@dataclass
class RuntimeSettings(Settings):
    title = "runtime and logging"

    seed: int = setting(0, "random seed", check=check_seed)
    device: str | None = setting(None, "torch device (default: cuda when available, else cpu)")
    wandb_mode: str | None = setting(None, "wandb logging mode (default: $WANDB_MODE, else offline; offline needs no "
                                           "account or network, sync later with `wandb sync`)", choices=WANDB_MODES)
    wandb_project: str = setting("vl-distill", "wandb project")
    wandb_entity: str | None = setting(None, "wandb entity (team or user)")
    name: str = setting(datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S"), "run name (wandb, default output "
                                                                               "folders)")
    progress: bool = setting(True, "show progress bars")

    @property
    def logging_mode(self) -> str:
        """The wandb mode in force: the flag, else the WANDB_MODE environment variable, else offline."""
        if self.wandb_mode:
            return self.wandb_mode
        mode = os.environ.get("WANDB_MODE", "offline")
        if mode not in WANDB_MODES:
            raise UserError(f"the environment's WANDB_MODE={mode!r} is not one of {', '.join(WANDB_MODES)}")
        return mode
