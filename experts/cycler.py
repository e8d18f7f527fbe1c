"""Cycling through expert trajectories without loading every buffer file at once (distill.py).

A .pt file pair is read whole when the cycler reaches it; a safetensors expert is opened memory-mapped
(experts/safetensors_buffer.py) and its snapshots are read when a segment uses them."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from experts.files import expert_files, load_expert_pair, unpaired_files
from experts.safetensors_buffer import INDEX_NAME, is_expert_file, open_expert, unlisted_files
from utils.cli import UserError


def _same(first: list[torch.Tensor], second: list[torch.Tensor]) -> bool:
    return all(torch.equal(a, b) for a, b in zip(first, second))  # stops at the first difference


def zero_segment(trajectory: list, min_snapshots: int, expert_epochs: int | None) -> tuple[int, int] | None:
    """(start, target) epochs of a segment distillation could draw whose two snapshots are identical.

    Matching divides by the distance the expert moved over the segment, so such a segment gives an
    infinite loss. With `expert_epochs` known, the segments checked are exactly those drawn (start
    0..min_snapshots - expert_epochs - 1); without it, every epoch that left the parameters unchanged
    within the snapshots used (a sound expert changes its parameters every epoch).
    """
    usable = min(len(trajectory), min_snapshots)  # (indexing only: a stored trajectory reads what it is asked)
    step = expert_epochs or 1
    for start in range(usable - step):
        if _same(trajectory[start], trajectory[start + step]):
            return start, start + step
    return None


class ExpertCycler:
    """Hands out (image trajectory, text trajectory) pairs, one buffer file in memory at a time (of a
    safetensors expert, the snapshots in use only).

    Files are visited in a shuffled order (reshuffled after each pass); all trajectories of a file
    are used before the next file is loaded. `--max_files` / `--max_experts` limit how many files
    and how many trajectories per file take part. The position is saved and restored on resume.
    """

    def __init__(self, directory: Path, meta: dict, generator: torch.Generator, min_snapshots: int,
                 max_files: int | None = None, max_experts: int | None = None, expert_epochs: int | None = None):
        files = expert_files(directory)
        if not files:
            raise UserError(f"no expert files (img_replay_buffer_<n>.pt + txt_replay_buffer_<n>.pt, or "
                            f"expert_<n>.safetensors listed in {INDEX_NAME}) in {directory}: run buffer.py first")
        for path in unpaired_files(directory):
            print(f"warning: ignoring {path} (its img/txt partner is missing: an interrupted write, or a deleted "
                  f"file; rerun buffer.py on the folder to finish it, or delete it)", file=sys.stderr)
        for path in unlisted_files(directory):
            print(f"warning: ignoring {path} ({INDEX_NAME} does not list it: an interrupted write; rerun buffer.py "
                  f"on the folder to list it, or delete it)", file=sys.stderr)
        self.files = files[:max_files] if max_files else files
        self.meta, self.generator = meta, generator
        self.min_snapshots, self.max_experts, self.expert_epochs = min_snapshots, max_experts, expert_epochs
        self.order: list[int] = []
        self.file_pos = 0
        self.traj_pos = 0
        self._loaded: tuple[int, list] | None = None
        self._opened: dict[int, list] = {}  # safetensors experts checked so far (no tensors: snapshots read on use)
        self._reshuffle()

    def _reshuffle(self) -> None:
        self.order = torch.randperm(len(self.files), generator=self.generator).tolist()
        self.file_pos = 0

    def _current(self) -> list:
        index = self.order[self.file_pos]
        if self._loaded is None or self._loaded[0] != index:
            self._loaded = None  # the expert before goes first: one in memory at a time
            self._loaded = (index, self._opened.get(index) or self._load(index))
        return self._loaded[1]

    def _load(self, index: int) -> list:
        """The checked trajectory pairs of file `index`. A safetensors expert's are kept (they hold no tensors), so
        that its checks, which read snapshots from the file, run once per run."""
        _, image_path, text_path = self.files[index]
        stored = is_expert_file(image_path)
        pairs = open_expert(image_path, self.meta) if stored else load_expert_pair(image_path, text_path, self.meta)
        pairs = pairs[:self.max_experts] if self.max_experts else pairs
        for number, (image_traj, text_traj) in enumerate(pairs):
            if len(image_traj) < self.min_snapshots:
                raise UserError(f"{image_path.name} holds trajectories of {len(image_traj)} snapshots, but "
                                f"--max_start_epoch and --expert_epochs need {self.min_snapshots} "
                                f"(start epochs 0..max_start_epoch-1 plus expert_epochs)")
            for path, trajectory in ((image_path, image_traj), (text_path, text_traj)):
                self._refuse_zero_segment(path, number, trajectory)
        if stored:
            self._opened[index] = pairs
        return pairs

    def _refuse_zero_segment(self, path: Path, number: int, trajectory: list) -> None:
        segment = zero_segment(trajectory, self.min_snapshots, self.expert_epochs)
        if segment is not None:
            start, target = segment
            raise UserError(f"{path}, expert {number} of the file: the snapshots of epochs {start} and {target} are "
                            f"identical, so the segment between them has zero length and matching it would divide "
                            f"by zero; the expert did not train there (learning rate 0 or frozen parameters?): "
                            f"train it again, or move its file pair out of the folder")

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
