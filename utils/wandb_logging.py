"""wandb runs, offline unless asked otherwise: no account or network is ever needed."""
from __future__ import annotations

import os


class NullRun:
    """Stands in for a wandb run when logging is disabled."""

    def log(self, *args, **kwargs):
        pass

    def finish(self):
        pass


def start_run(args, job_type: str, directory: str | None = None, suffix: str = ""):
    if args.wandb_mode == "disabled":
        return NullRun()
    os.environ.setdefault("WANDB_SILENT", "true")
    import wandb

    if directory:
        os.makedirs(directory, exist_ok=True)
    return wandb.init(mode=args.wandb_mode, project=args.wandb_project, entity=args.wandb_entity,
                      name=f"{args.name}{suffix}", job_type=job_type, config=vars(args), dir=directory,
                      reinit="finish_previous")
