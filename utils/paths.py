"""Output locations checked before any work starts, so that a bad path fails in the first second and
not at the first save hours later, and no output is ever an input (`refuse_outputs_over_inputs`)."""
from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path

from utils.cli import UserError


def ensure_output_dir(path, flag: str, given=None) -> Path:
    """Create the output folder `path` (and its parents) and prove that a file can be written there.

    `flag` and `given` (default: `path`) name the option and the value the folder came from, for the
    message. Refuses a path that is a file, lies under a file, or is not writable.
    """
    path = Path(path)
    for parent in [path, *path.parents]:
        if parent.exists() and not parent.is_dir():
            raise UserError(f"{flag} {given or path}: {parent} is a file, not a folder")
        if parent.is_symlink() and not parent.exists():  # mkdir would say only "File exists"
            raise UserError(f"{flag} {given or path}: {parent} is a symbolic link to nothing (its target is missing, "
                            f"or links lead back to it); create its target or give another folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", suffix=".tmp", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise UserError(f"{flag} {given or path}: {path} cannot be written to ({err.strerror or err}); choose another folder "
                        f"or fix its permissions") from None
    return path


def ensure_output_file(path, flag: str) -> Path:
    """Check that the file `path` can be written (its folder exists or can be made; it is not a folder)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder; give a file name")
    ensure_output_dir(path.parent, flag, given=path)
    return path


def disk_full_message(err: OSError, path) -> str | None:
    """The message for a failed write of `path` when the disk is full (None for other errors)."""
    if getattr(err, "errno", None) not in (errno.ENOSPC, errno.EDQUOT):
        return None
    path = Path(path)
    kept = f"the previous {path.name} is intact" if path.exists() else f"{path.name} was not written"
    return (f"the disk is full (ENOSPC) while writing {path}; {kept} (files are replaced only once complete). "
            f"Free space, then run the command again (buffer.py continues the expert it was training, "
            f"distill.py continues with --resume from its last complete set)")


def _resolved(path: Path) -> Path:
    """`path` made absolute with every symbolic link followed (as far as it exists)."""
    try:
        return path.resolve()
    except (OSError, RuntimeError):  # a link loop: compare the path as written
        return Path(os.path.abspath(path))


def same_path(a, b) -> bool:
    """Whether `a` and `b` name the same file or folder: equal once symbolic links are followed, or (both
    existing) the same file on disk, which also catches hard links."""
    a, b = Path(a).expanduser(), Path(b).expanduser()
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return _resolved(a) == _resolved(b)


def _inside(path: Path, folder: Path) -> bool:
    """Whether `path` is `folder` or lies somewhere inside it (symbolic links followed)."""
    path, folder = _resolved(path), _resolved(folder)
    return path == folder or folder in path.parents


def refuse_outputs_over_inputs(outputs: dict, inputs: dict, emptied: tuple[str, ...] = ()) -> None:
    """Refuse, before any work, a run that would write over what it reads.

    `outputs` and `inputs` map a label (the flag or key, e.g. "--out") to a path, or None when not given.
    Every output is compared with every input and with every other output (resolved, symbolic links
    followed; existing files by identity, so hard links count). The outputs named in `emptied` are
    folders whose contents the program may delete: no input may lie inside them.
    """
    given = {label: Path(path) for label, path in {**inputs, **outputs}.items() if path is not None}
    for label, path in given.items():
        if "\0" in str(path):
            raise UserError(f"{label} {str(path)!r} holds a NUL byte, which no file name can contain")
    outs = [(label, given[label]) for label in outputs if label in given]
    ins = [(label, given[label]) for label in inputs if label in given]
    for i, (out_label, out) in enumerate(outs):
        for in_label, path in ins + outs[i + 1:]:
            what = "reads" if (in_label, path) in ins else "also writes"
            if same_path(out, path):
                raise UserError(f"{out_label} {out} is the same path as {in_label} {path}, which this run {what}: "
                                f"it would be overwritten; give {out_label} another path")
            if out_label in emptied and (in_label, path) in ins and _inside(path, out):
                raise UserError(f"{out_label} {out} holds {in_label} {path}, and this run may delete what is in "
                                f"{out_label}: keep your inputs outside it or give {out_label} another folder")


def json_object_in(path, max_bytes: int = 2**26) -> dict | None:
    """The JSON object that the file `path` holds; None when it holds anything else, cannot be read, or is
    larger than `max_bytes` (then it is no small record of this project's)."""
    try:
        if Path(path).stat().st_size > max_bytes:
            return None
        value = json.loads(Path(path).read_bytes())
    except (OSError, ValueError, RecursionError):  # also undecodable bytes and invalid JSON (both ValueError)
        return None
    return value if isinstance(value, dict) else None
