"""Cycling through expert trajectories without loading every buffer file at once (distill.py)."""
from __future__ import annotations

from pathlib import Path

import torch

from experts.files import expert_files, load_expert_pair
from utils.cli import UserError


class ExpertCycler:
    """Hands out (image trajectory, text trajectory) pairs, one buffer file in memory at a time.

    Files are visited in a shuffled order (reshuffled after each pass); all trajectories of a file
    are used before the next file is loaded. `--max_files` / `--max_experts` limit how many files
    and how many trajectories per file take part. The position is saved and restored on resume.
    """

    def __init__(self, directory: Path, meta: dict, generator: torch.Generator, min_snapshots: int,
                 max_files: int | None = None, max_experts: int | None = None):
        files = expert_files(directory)
        if not files:
            raise UserError(f"no expert files (img_replay_buffer_<n>.pt + txt_replay_buffer_<n>.pt) in {directory}: "
                            f"run buffer.py first")
        self.files = files[:max_files] if max_files else files
        self.meta, self.generator = meta, generator
        self.min_snapshots, self.max_experts = min_snapshots, max_experts
        self.order: list[int] = []
        self.file_pos = 0
        self.traj_pos = 0
        self._loaded: tuple[int, list] | None = None
        self._reshuffle()

    def _reshuffle(self) -> None:
        self.order = torch.randperm(len(self.files), generator=self.generator).tolist()
        self.file_pos = 0

    def _current(self) -> list:
        index = self.order[self.file_pos]
        if self._loaded is None or self._loaded[0] != index:
            _, image_path, text_path = self.files[index]
            pairs = load_expert_pair(image_path, text_path, self.meta)
            pairs = pairs[:self.max_experts] if self.max_experts else pairs
            for image_traj, _ in pairs:
                if len(image_traj) < self.min_snapshots:
                    raise UserError(f"{image_path.name} holds trajectories of {len(image_traj)} snapshots, but "
                                    f"--max_start_epoch and --expert_epochs need {self.min_snapshots} "
                                    f"(start epochs 0..max_start_epoch-1 plus expert_epochs)")
            self._loaded = (index, pairs)
        return self._loaded[1]

    def peek_check(self) -> None:
        """Load the first file now, so that a bad buffer fails before any heavy work."""
        self._current()

    def next(self) -> tuple[list, list]:
        pairs = self._current()
        pair = pairs[self.traj_pos]
        self.traj_pos += 1
        if self.traj_pos >= len(pairs):
            self.traj_pos = 0
            self.file_pos += 1
            if self.file_pos >= len(self.order):
                self._reshuffle()
        return pair

    def state(self) -> dict:
        return {"order": list(self.order), "file_pos": self.file_pos, "traj_pos": self.traj_pos,
                "num_files": len(self.files)}

    def restore(self, state: dict) -> None:
        if state.get("num_files") != len(self.files):
            raise UserError(f"the buffer now has {len(self.files)} expert files, the resumed run used "
                            f"{state.get('num_files')}; resume with the same buffer (or --max_files)")
        self.order, self.file_pos, self.traj_pos = list(state["order"]), state["file_pos"], state["traj_pos"]
