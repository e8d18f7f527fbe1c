"""wandb runs, offline unless asked otherwise: no account or network is ever needed."""
from __future__ import annotations

import os


class NullRun:
    """Stands in for a wandb run when logging is disabled."""

    def log(self, *args, **kwargs):
        pass

    def finish(self):
        pass


def start_run(mode: str, project: str, entity: str | None, name: str, config: dict, job_type: str,
              directory: str | None = None, suffix: str = ""):
    """A wandb run (`mode`: online, offline or disabled) logging `config` as its configuration."""
    if mode == "disabled":
        return NullRun()
    os.environ.setdefault("WANDB_SILENT", "true")
    import wandb

    if directory:
        os.makedirs(directory, exist_ok=True)
    return wandb.init(mode=mode, project=project, entity=entity, name=f"{name}{suffix}", job_type=job_type,
                      config=config, dir=directory,
                      reinit="finish_previous")
