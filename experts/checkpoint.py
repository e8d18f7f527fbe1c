"""The expert in training, kept on disk after every epoch so that an interrupted buffer.py continues it.

While expert n trains, `<buffer folder>/.partial_<n>~HOST~PID/` holds `snapshot_<e>.pt` (the image and
text snapshots after epoch e; 0 is before training) and `state.pt` (the epochs done, the model's and
optimisers' states, every random stream, the per-epoch metrics and the settings that shape the
expert). Readers never look at hidden folders. A later run claims the folder of a process that no
longer runs by renaming it to its own name (of two claimants only one rename succeeds), checks the
settings and continues after the last complete epoch, so that the finished expert is bit-identical to
one trained in one go. The folder goes once the expert's file pair is written.

A run claims all its numbers before it trains: each number's partial folder is made (or a dead run's
renamed) while holding `.claiming_<n>/`, which os.mkdir creates for one process only. A run that finds
it held, or finds a live run's partial folder or a file with that number, takes the next number, so
two runs started together on one folder never train the same expert.
"""
from __future__ import annotations

import itertools
import os
import random
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from experts.files import complete_numbers, tidy_index, used_numbers
from settings.base import current_names
from utils.cli import UserError
from utils.io import atomic_torch_save, is_stale, owner_tag, remove_stale_temporaries, safe_torch_load
from utils.rng import restore_rng, rng_state

_PARTIAL = re.compile(r"\.partial_(?P<n>\d+)~(?P<host>[^~/]*)~(?P<pid>\d+)")
STATE = "state.pt"
STATE_KEYS = frozenset({"settings", "epochs_done", "model", "optimizers", "rng", "python_rng", "numpy_rng", "history",
                        "seconds"})  # what ExpertCheckpoint.save writes
CLAIM_LOCK_STALE_SECONDS = 60  # a `.claiming_<n>` folder older than this was left by a killed claimer


def _partials(directory: Path) -> list[tuple[int, Path, bool]]:
    """(expert number, folder, whether its writer is gone) for every partial expert folder."""
    found = []
    for path in Path(directory).glob(".partial_*"):
        match = _PARTIAL.fullmatch(path.name)
        if match and path.is_dir():
            found.append((int(match["n"]), path, is_stale(path, match["host"], int(match["pid"]))))
    return sorted(found)


def _say(message: str) -> None:
    print(message, flush=True)


def tidy(directory: Path) -> None:
    """Remove what killed runs left in a buffer folder: temporary files, the partial folders of experts
    that were written after all, and the image file of a pair whose text file never came (its partial
    folder is kept, so the expert is written again from it); in the safetensors layout, bring the index
    up to date with the expert files."""
    directory = Path(directory)
    for path in remove_stale_temporaries(directory):
        _say(f"removed {path.name} (left by an interrupted run)")
    for lock in directory.glob(".claiming_*"):  # held for microseconds: an old one's claimer was killed holding it
        try:
            if time.time() - lock.stat().st_mtime > CLAIM_LOCK_STALE_SECONDS:
                lock.rmdir()
        except OSError:
            pass
    complete = complete_numbers(directory)
    for number, folder, gone in _partials(directory):
        if not gone:
            continue
        if number in complete:
            shutil.rmtree(folder, ignore_errors=True)
            _say(f"removed {folder.name}: expert {number} was written completely")
            continue
        half = directory / f"img_replay_buffer_{number}.pt"
        if half.is_file() and not (directory / f"txt_replay_buffer_{number}.pt").exists():
            half.unlink()
            _say(f"removed {half.name}: its text file was never written; expert {number} is written again "
                 f"from {folder.name}")
    tidy_index(directory)  # safetensors: list the experts a killed run wrote but did not list


def numbers_to_train(directory: Path, count: int, owners: list[str] | None = None) -> list[int]:
    """Claim `count` expert numbers and return them, the i-th for the process `owners[i]` (`HOST~PID`, by
    default this one): first those of partial experts a finished run left (continued), then the lowest
    numbers with no file in the folder and no partial expert of a live run. A claimed number has a partial
    folder in its owner's name (see the module docstring)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    owners = owners or [owner_tag()] * count
    left = sorted({n for n, _, gone in _partials(directory) if gone})
    numbers = []
    for n in itertools.chain(left, itertools.count()):
        if len(numbers) == count:
            break
        if n not in numbers and _claim(directory, n, owners[len(numbers)]):
            numbers.append(n)
    return numbers


def _claim(directory: Path, number: int, owner: str) -> bool:
    """Make `number` the expert of process `owner` (False: it has a file, a live run trains it, or another
    process is claiming it this moment). A dead run's partial folder of the number becomes the owner's."""
    lock = directory / f".claiming_{number}"
    try:
        lock.mkdir()
    except FileExistsError:
        return False
    try:
        mine = directory / f".partial_{number}~{owner}"
        others = [(folder, gone) for n, folder, gone in _partials(directory) if n == number and folder != mine]
        if number in used_numbers(directory) or not all(gone for _, gone in others):
            return False
        dead = [folder for folder, _ in others]
        kept = next((folder for folder in dead if (folder / STATE).is_file()), None)
        if kept is not None and not (mine / STATE).is_file():  # a dead run's expert in training: continued
            shutil.rmtree(mine, ignore_errors=True)
            os.rename(kept, mine)
            dead.remove(kept)
        for folder in dead:
            shutil.rmtree(folder, ignore_errors=True)
        mine.mkdir(exist_ok=True)
        return True
    finally:
        lock.rmdir()


def _numpy_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "gauss": float(gauss)}


def _set_numpy_state(state: dict) -> None:
    np.random.set_state((state["kind"], state["keys"].numpy().astype(np.uint32), state["pos"], state["has_gauss"],
                         state["gauss"]))


class ExpertCheckpoint:
    """This process's partial folder for expert `number` (see the module docstring)."""

    def __init__(self, directory: Path, number: int, settings: dict):
        self.folder = Path(directory) / f".partial_{number}~{owner_tag()}"
        self.number, self.settings = number, settings

    @classmethod
    def claim(cls, directory: Path, number: int, settings: dict) -> tuple[ExpertCheckpoint, dict | None]:
        """This process's checkpoint for expert `number` (claimed by `numbers_to_train`, or now), and the state
        to continue from when the folder holds one made with the same `settings` (None: start afresh)."""
        checkpoint = cls(directory, number, settings)
        if not checkpoint.folder.is_dir():
            _claim(Path(directory), number, owner_tag())
        checkpoint.folder.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(checkpoint.folder)
        state = checkpoint._read_state()
        if state is None:  # emptied, not removed: the folder is this process's claim on the number
            for path in checkpoint.folder.iterdir():
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink()
        return checkpoint, state

    def _read_state(self) -> dict | None:
        path = self.folder / STATE
        if not path.is_file():
            return None
        try:
            state = safe_torch_load(path, "partial expert state")
        except UserError as err:
            _say(f"expert {self.number}: {err}; training it afresh")
            return None
        problem = self._state_problem(state)
        if problem:
            _say(f"expert {self.number}: the interrupted run's partial expert cannot be continued ({path.name} or "
                 f"its snapshots {problem}); training it afresh")
            return None
        made_with = current_names(state.get("settings", {}))  # (saved before a setting was renamed)
        if made_with != self.settings:
            changed = sorted(k for k in {*made_with, *self.settings} if made_with.get(k) != self.settings.get(k))
            _say(f"expert {self.number}: the interrupted run's partial expert was made with other settings "
                 f"({', '.join(changed[:4])}); training it afresh")
            return None
        return state

    def _state_problem(self, state) -> str | None:
        """What makes a partial state unusable (damaged, of another layout, non-finite, snapshots missing), or None."""
        if not isinstance(state, dict) or not STATE_KEYS <= state.keys():
            return f"lack{'s' if isinstance(state, dict) else ''} the keys {', '.join(sorted(STATE_KEYS))}"
        done = state["epochs_done"]
        if not isinstance(done, int) or isinstance(done, bool) or done < 0 or not isinstance(state["history"], list):
            return f"hold epochs_done {done!r} and a history of type {type(state['history']).__name__}"
        if not isinstance(state["model"], dict) or not all(
                isinstance(v, torch.Tensor) and (not v.is_floating_point() or torch.isfinite(v).all())
                for v in state["model"].values()):
            return "hold a model state that is not a dict of finite tensors"
        for epoch in range(done + 1):
            try:
                snapshot = safe_torch_load(self._snapshot_path(epoch), "partial expert snapshot")
            except UserError:
                return f"lack a readable snapshot of epoch {epoch}"
            if not (isinstance(snapshot, list) and len(snapshot) == 2 and all(
                    isinstance(part, list) and all(isinstance(x, torch.Tensor) and x.is_floating_point()
                                                   and torch.isfinite(x).all() for x in part) for part in snapshot)):
                return f"hold a snapshot of epoch {epoch} that is not two lists of finite tensors"
        return None

    def _snapshot_path(self, epoch: int) -> Path:
        return self.folder / f"snapshot_{epoch}.pt"

    def save_snapshot(self, epoch: int, image_snapshot: list, text_snapshot: list) -> None:
        atomic_torch_save([image_snapshot, text_snapshot], self._snapshot_path(epoch))

    def save(self, epochs_done: int, model, optimizers, loader, history: list[dict], seconds: float) -> None:
        """After epoch `epochs_done` (its snapshot saved first): everything needed to continue from here."""
        state = {"settings": self.settings, "epochs_done": epochs_done, "model": model.state_dict(),
                 "optimizers": [o.state_dict() for o in optimizers],
                 "rng": rng_state(getattr(loader, "generator", None)), "python_rng": random.getstate(),
                 "numpy_rng": _numpy_state(), "history": history, "seconds": seconds}
        atomic_torch_save(state, self.folder / STATE)

    def restore(self, state: dict, model, optimizers, loader) -> tuple[list, list]:
        """Put `state` back into the model, optimisers and random streams; returns the trajectories so far."""
        model.load_state_dict(state["model"])
        for optimizer, saved in zip(optimizers, state["optimizers"]):
            optimizer.load_state_dict(saved)
        restore_rng(state["rng"], getattr(loader, "generator", None))
        random.setstate(state["python_rng"])
        _set_numpy_state(state["numpy_rng"])
        snapshots = [safe_torch_load(self._snapshot_path(e), "partial expert snapshot")
                     for e in range(state["epochs_done"] + 1)]
        return [s[0] for s in snapshots], [s[1] for s in snapshots]

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
