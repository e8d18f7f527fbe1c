"""Cycling through expert trajectories without loading every buffer file at once."""
from __future__ import annotations

from pathlib import Path

import torch

from networks import trainable_parameters
from experts.files import (
    COMPATIBILITY_KEYS,
    LEGACY_DEFAULTS,
    META_NAME,
    buffer_dir,
    expert_files,
    load_expert_pair,
)
from utils.cli import UserError


def locate_buffer(buffer_path, dataset: str, image_encoder: str, text_encoder: str) -> Path:
    """`--buffer_path` may be the folder holding the files or the buffer root (then the layout is appended)."""
    given = Path(buffer_path)
    if (given / META_NAME).is_file() or any(given.glob("img_replay_buffer_*.pt")):
        return given
    return buffer_dir(given, dataset, image_encoder, text_encoder)


def check_buffer_matches(meta: dict | None, directory: Path, expected: dict) -> None:
    """Refuse a buffer made with other encoders, image size, text dimension or data set than asked."""
    if meta is None:
        raise UserError(f"no experts in {directory} (no {META_NAME}): run buffer.py with the same --dataset, "
                        f"--image_encoder and --text_encoder first, or point --buffer_path at its output")
    found = {**LEGACY_DEFAULTS, **meta}
    problems = [f"{key}: buffer has {found.get(key)!r}, this run asks for {expected[key]!r}"
                for key in COMPATIBILITY_KEYS if key in expected and found.get(key) != expected[key]]
    if problems:
        hint = (" (the experts must train what distillation matches: the same --train_stages, --image_projection "
                "and --lora_rank)" if any(p.startswith("trainable_parts") for p in problems) else
                " (pass the --image_norm the experts were trained with)" if any(p.startswith("image_norm")
                                                                                 for p in problems) else "")
        raise UserError(f"the experts in {directory} do not fit this run ({'; '.join(problems[:3])}){hint}")


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


def load_expert_weights(model, directory: Path, meta: dict, number: int | None = None,
                        epoch: int | None = None) -> tuple[int, int]:
    """Copy expert `number`'s snapshot at `epoch` (default: the first file's expert, its last snapshot)
    into the trainable parameters of `model.image_part` and `model.text_projection`; returns (number, epoch) used."""
    files = {n: (img, txt) for n, img, txt in expert_files(directory)}
    if not files:
        raise UserError(f"no expert files in {directory}: run buffer.py first")
    number = min(files) if number is None else number
    if number not in files:
        raise UserError(f"no expert file pair number {number} in {directory} (have {sorted(files)})")
    image_traj, text_traj = load_expert_pair(*files[number], meta)[0]
    epoch = len(image_traj) - 1 if epoch is None else epoch
    if not 0 <= epoch < len(image_traj):
        raise UserError(f"expert {number} has snapshots 0..{len(image_traj) - 1}, asked for epoch {epoch}")
    with torch.no_grad():
        for module, snapshot in ((model.image_part, image_traj[epoch]), (model.text_projection, text_traj[epoch])):
            for param, value in zip(trainable_parameters(module), snapshot):
                param.copy_(value)
    return number, epoch
