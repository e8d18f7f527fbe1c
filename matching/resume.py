"""Where a distillation run stands, and continuing a saved one with --resume.

A `ResumePoint` is everything a run needs to go on from the start of an iteration as if it had never
stopped; every set distill.py writes holds one (its `state` entry, docs/file-formats.md). `load_resume`
reads and checks the file --resume names, `resume_point` puts a new run where that file left off, and
`check_ranks_agree` makes sure every torchrun process still holds the same learned state.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from data.distilled_set import learned_lr_problem, load_distilled_set, resume_state_problem
from matching.distiller import Distiller
from matching.streams import SegmentStreams, saved_streams, streams_entries
from settings.base import current_names
from settings.programs import DistillRunSettings
from utils import distributed
from utils.cli import UserError
from utils.distributed import ProcessGroupInfo

# Settings a resumed run must share with the run that wrote the file.
RESUME_KEYS = ("dataset", "image_encoder", "text_encoder", "text_identity", "image_size", "num_pairs", "extra_image_encoders")


@dataclass
class ResumePoint:
    """Everything needed to go on from the start of `iteration` exactly as a run that never stopped: the
    learned state (`Distiller.learned_copy`, copied), the random streams, the expert position and the guard's
    history as they were then, the best evaluation so far, and this iteration's evaluation once it ran.

    A run keeps the point of the iteration it is in; whatever happens inside the iteration (a Ctrl-C in a
    step, an evaluation or a write), that point is still whole, and it is what gets saved."""

    iteration: int
    learned: dict
    streams: list[dict]  # every segment stream's state, slot 0 first (matching/streams.py)
    guard: dict
    best_r_mean: float = -1.0
    best_iteration: int = -1  # -1: nothing evaluated yet
    metrics: dict = field(default_factory=dict)

    def state(self) -> dict:
        """The `state` entry of the saved set (docs/file-formats.md)."""
        return {"optimizers": self.learned["state"]["optimizers"], **streams_entries(self.streams),
                "best_r_mean": self.best_r_mean, "best_iteration": self.best_iteration, "guard": self.guard}

    @classmethod
    def capture(cls, distiller: Distiller, streams: SegmentStreams, iteration: int, best_r_mean: float = -1.0,
                best_iteration: int = -1) -> ResumePoint:
        """The run as it stands now, at the start of `iteration` (nothing evaluated there yet)."""
        return cls(iteration, distiller.learned_copy(), streams.state(), distiller.guard.state(), best_r_mean,
                   best_iteration)


def check_resume(payload: dict, settings: DistillRunSettings, text_identity: str, path) -> None:
    """Refuse a --resume file that is no distill.py run of these settings, or one that cannot be continued."""
    config = current_names(payload["config"])  # (a file written before a setting was renamed)
    source = config.get("source", "distilled")
    if source != "distilled":  # a coreset or feature-centroid set: nothing was learned, so nothing to continue
        raise UserError(f"--resume {path} is a {source} set written by evaluate.py, not a distill.py run: it holds "
                        f"no run to continue; --resume takes a distilled_*.pt from a distill.py --save_dir")
    expected = {**settings.flat_config(), "text_identity": text_identity}
    problems = [f"{k}: file has {config.get(k)!r}, this run has {expected[k]!r}"
                for k in RESUME_KEYS if config.get(k) != expected[k]]
    if problems:
        raise UserError(f"--resume {path} does not match this run ({'; '.join(problems)})")
    if not payload.get("state") or "image_syn" not in payload:
        raise UserError(f"--resume {path} holds no optimiser/RNG state or no pixels (not written by distill.py)")
    problem = resume_state_problem(payload["state"])
    if problem:
        raise UserError(f"--resume {path} cannot be resumed: its state {problem}")
    problem = learned_lr_problem(payload)
    if problem:
        raise UserError(f"--resume {path} cannot be resumed: it {problem}")
    if payload["iteration"] > settings.distill.iterations:
        raise UserError(f"--resume {path} is at iteration {payload['iteration']}, beyond --iterations {settings.distill.iterations}")


def resume_point(payload: dict, path, distiller: Distiller, streams: SegmentStreams, say) -> ResumePoint:
    """Put the run where the file `path` left it and return that point; a clear error when the file's state
    does not fit this run."""
    state = payload["state"]
    try:
        distiller.restore(payload)
        distiller.guard.restore(state["guard"])
        note = streams.restore(saved_streams(state), payload["iteration"])
    except (ValueError, RuntimeError, UserError) as err:
        raise UserError(f"--resume {path} does not fit this run: {err}") from None
    if note:
        say(f"note: {note}")
    point = ResumePoint.capture(distiller, streams, payload["iteration"], state["best_r_mean"],
                                state["best_iteration"])
    return replace(point, metrics=payload["metrics"])


def load_resume(settings: DistillRunSettings, text_identity: str, group: ProcessGroupInfo, device: torch.device,
                say) -> dict | None:
    """The set --resume names, checked against this run (None without --resume). Rank 0 reads it and hands it
    to the others: it need not exist on every machine."""
    resume = distributed.from_main_process(
        load_distilled_set(settings.distill.resume) if settings.distill.resume and group.is_main else None, group, device)
    if resume is not None:
        check_resume(resume, settings, text_identity, settings.distill.resume)
        if resume["iteration"] == settings.distill.iterations:
            say(f"note: --resume {settings.distill.resume} is already at --iterations {settings.distill.iterations}: "
                f"nothing is left to learn; give a larger --iterations to continue it")
    return resume


def check_ranks_agree(point: ResumePoint, group: ProcessGroupInfo, last: Path) -> None:
    """Every process holds rank 0's learned state at `point` (a collective under torchrun); `last`: the file
    a stopped run continues from."""
    drifted = distributed.differing_ranks(point.learned, group)
    if drifted:
        raise UserError(f"the processes' synthetic sets differ at iteration {point.iteration} (ranks "
                        f"{', '.join(map(str, drifted))} against rank 0): every process must apply the same "
                        f"averaged update to the same state. Same code, data and buffer on every machine? "
                        f"Continue from {last} with --resume")
