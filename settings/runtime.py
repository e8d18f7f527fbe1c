"""Seed, device, logging and progress (every program)."""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

from settings.base import Computed, Settings, described, non_empty, setting
from settings.choices import WANDB_MODES
from utils.cli import UserError
from utils.device import device_problem

# numpy's legacy seeding takes 32 bits (utils/device.py reduces larger seeds modulo 2**32, so two such seeds
# would share numpy's stream); up to this bound, every seed derived from it (utils/seeds.py: seed * 100003 +
# expert number, seed + about 1e9) stays far inside what torch.manual_seed accepts (below 2**63).
MAX_SEED = 2**32 - 1

check_seed = described(lambda v: None if 0 <= v <= MAX_SEED else f"must be a whole number from 0 to {MAX_SEED}",
                       f"0 to {MAX_SEED}")

MAX_NAME_BYTES = 255  # the longest file name that common file systems (ext4, APFS, NTFS) take


def name_problem(name) -> str | None:
    """What makes `name` unfit to be one folder name (distill.py writes to runs/<dataset>/<name>), or None."""
    if name is None:
        return None
    if not name.strip():
        return "must not be empty"
    if "/" in name or "\\" in name or "\0" in name or name in (".", ".."):
        return "must be a file name, not a path (no /, \\ or NUL byte; not . or ..)"
    if len(name.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
        return f"must be at most {MAX_NAME_BYTES} bytes long (a file name)"
    return None


RUN_NAME_FORMAT = "%Y-%m-%d_%H-%M-%S"


def default_run_name() -> str:
    """The run name when none is given: the local date and time at which the settings are made."""
    return datetime.datetime.now().strftime(RUN_NAME_FORMAT)


check_name = described(name_problem, f"a file name: not empty, no / \\ or NUL, not . or .., at most {MAX_NAME_BYTES} "
                                    "bytes")


@dataclass
class RuntimeSettings(Settings):
    title = "runtime and logging"

    seed: int = setting(0, "random seed", check=check_seed)
    device: str | None = setting(None, "torch device (default: cuda when available, else cpu)",
                                 check=described(device_problem, "cpu, or cuda[:N] / mps when present"))
    wandb_mode: str | None = setting(None, "wandb logging mode (default: $WANDB_MODE, else offline; offline needs no "
                                           "account or network, sync later with `wandb sync`)", choices=WANDB_MODES)
    wandb_project: str = setting("vl-distill", "wandb project", check=non_empty)
    wandb_entity: str | None = setting(None, "wandb entity (team or user)")
    name: str = setting(Computed(default_run_name), "run name (wandb, default output folders): a file name, not a "
                                                     "path; default: the date and time the run starts",
                        check=check_name)
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
