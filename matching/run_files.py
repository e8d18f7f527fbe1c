"""The folder a distillation run writes (--save_dir) and the checks made on it before any work.

The folder holds `distilled_<iteration>.pt`, `distilled_best.pt`, `distilled_last.pt`, timing.json, and
with --draw the image grids and nearest captions of every evaluation (docs/file-formats.md).
"""
from __future__ import annotations

import re
from pathlib import Path

from data.distilled_set import set_source
from data.exported_set import is_exported_folder
from experts.files import locate_buffer
from matching.timing import TIMING_NAME
from settings.programs import DistillRunSettings
from utils.cli import UserError
from utils.paths import ensure_output_dir, json_object_in, refuse_outputs_over_inputs


class RunFiles:
    """Where a run writes: the distilled sets, grids, nearest captions. The folder is checked (and made) first."""

    def __init__(self, save_dir: Path, create: bool = True):
        self.dir = ensure_output_dir(save_dir, "--save_dir") if create else Path(save_dir)
        self.last = self.dir / "distilled_last.pt"
        self.best = self.dir / "distilled_best.pt"

    def at(self, iteration: int) -> Path:
        return self.dir / f"distilled_{iteration:06d}.pt"


def save_dir_of(settings: DistillRunSettings) -> Path:
    """Where the run writes: --save_dir, else runs/<dataset>/<name>."""
    return Path(settings.distill.save_dir or Path("runs") / settings.data.dataset / settings.runtime.name)


# The files distill.py writes into --save_dir that an earlier run may have left (they are replaced).
OWN_SETS = re.compile(r"distilled_(best|last|\d{6,})\.pt")


def check_run_paths(settings: DistillRunSettings) -> None:
    """Before any work: the folder this run writes is none of the paths it reads, and the files of its names
    there (sets, timing.json) are distill.py's own, so that replacing them loses nothing of another kind."""
    save_dir, buffer = save_dir_of(settings), settings.distill.buffer_path
    if settings.distill.resume and is_exported_folder(settings.distill.resume):
        raise UserError(f"--resume {settings.distill.resume} is an exported set folder, which holds no optimiser "
                        f"state or random streams: resume from the distilled_<...>.pt file distill.py wrote (an "
                        f"export serves evaluate.py --distilled and other code)")
    located = locate_buffer(buffer, settings.data.dataset, settings.model.image_encoder, settings.model.text_encoder)
    refuse_outputs_over_inputs({"--save_dir": save_dir, "--cache_dir": settings.data.cache_dir},
                               {"--buffer_path": buffer, "the expert folder of --buffer_path": located,
                                "--resume": settings.distill.resume, **settings.data_paths()})
    if not save_dir.is_dir():
        return
    for path in sorted(save_dir.iterdir()):
        if OWN_SETS.fullmatch(path.name) and set_source(path) != "distilled":
            raise UserError(f"--save_dir {save_dir} holds {path.name}, which is not a set written by distill.py, and "
                            f"this run would replace it: move it away or give --save_dir another folder")
    earlier = save_dir / "distilled_last.pt"
    if earlier.is_file() and not settings.distill.resume and not settings.distill.overwrite:
        raise UserError(f"--save_dir {save_dir} holds an earlier run ({earlier.name}), which this run would replace: "
                        f"continue it with --resume {earlier}, give --save_dir another folder, or pass "
                        f"--overwrite True to start over there")
    timing = save_dir / TIMING_NAME
    if timing.exists() and json_object_in(timing) is None:
        raise UserError(f"--save_dir {save_dir} holds {TIMING_NAME}, which is not distill.py's timing record, and "
                        f"this run would replace it: move it away or give --save_dir another folder")
