"""A run's timing record, timing.json beside its sets.

It holds the seconds spent in matching iterations (evaluations excluded) and their count, the part of
those seconds spent averaging over the processes (torchrun), and on a GPU the peak memory of a matching
iteration. A resumed run carries on the record of the folder it resumes from. When a run stops because its
--time_budget is spent, the record says so ("budget_stop": the iteration it stopped at), so that a pipeline
re-run takes that set as finished instead of spending another budget; a run that continues from it drops
the mark. The record stays outside the set files so that two runs with the same seed write identical sets.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from matching.distiller import Distiller
from matching.resume import ResumePoint
from matching.streams import SegmentStreams
from utils.io import atomic_write_json, read_json_if_present

TIMING_NAME = "timing.json"
BUDGET_STOP = "budget_stop"


class RunTiming:
    def __init__(self, record: dict | None = None):
        self.record = {"seconds": 0.0, "iterations": 0, "sync_seconds": 0.0}
        self.record.update(record or {})

    @classmethod
    def continued(cls, resume: str | None, main_process: bool) -> RunTiming:
        """A fresh record, or on rank 0 of a run with --resume the one beside the file it resumes from (without
        the mark of a budget stop: this run goes on from there)."""
        record = cls.read(Path(resume).parent) if resume and main_process else None
        if record:
            record.pop(BUDGET_STOP, None)
        return cls(record)

    def stopped_on_budget(self, iteration: int) -> None:
        """Mark that the run stopped at `iteration` because its --time_budget was spent."""
        self.record[BUDGET_STOP] = iteration

    def step(self, distiller: Distiller, streams: SegmentStreams, point: ResumePoint,
             device: torch.device) -> tuple[dict, ResumePoint]:
        """The matching iteration that starts at `point`, timed: its statistics and the point after it."""
        began, synced = time.perf_counter(), distiller.sync_seconds
        if device.type == "cuda":  # peak of the matching iterations alone (evaluations train other models)
            torch.cuda.reset_peak_memory_stats(device)
        stats = distiller.step(streams.local, point.iteration, before=point.learned)
        if device.type == "cuda":
            self.record["peak_gpu_mib"] = max(self.record.get("peak_gpu_mib", 0.0),
                                              torch.cuda.max_memory_allocated(device) / 2**20)
        point = ResumePoint.capture(distiller, streams, point.iteration + 1, point.best_r_mean, point.best_iteration)
        self.record["seconds"] += time.perf_counter() - began
        self.record["sync_seconds"] = self.record.get("sync_seconds", 0.0) + distiller.sync_seconds - synced
        self.record["iterations"] += 1
        return stats, point

    @staticmethod
    def read(folder: Path) -> dict:
        """The record of the run that wrote `folder` ({} when it has none): the one reader of timing.json."""
        return read_json_if_present(Path(folder) / TIMING_NAME) or {}

    @staticmethod
    def budget_stop(folder: Path) -> int | None:
        """The iteration at which the run that wrote `folder` stopped on its --time_budget, if it did."""
        return RunTiming.read(folder).get(BUDGET_STOP)

    def write(self, folder: Path) -> None:
        atomic_write_json(self.record, folder / TIMING_NAME)

    def summary(self) -> str:
        """Seconds per matching iteration, and the peak GPU memory when it was measured."""
        per_iteration = self.record["seconds"] / max(self.record["iterations"], 1)
        memory = f", peak GPU memory {self.record['peak_gpu_mib']:.0f} MiB" if "peak_gpu_mib" in self.record else ""
        return f"{per_iteration:.2f}s per matching iteration{memory}"
