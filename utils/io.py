"""Safe file I/O: atomic writes and pickle-free loads."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from utils.cli import UserError
from utils.paths import disk_full_message


def _temporary_sibling(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(tmp)


def atomic_torch_save(obj, path, *, overwrite: bool = True) -> Path:
    """Write `obj` with `torch.save` to a temporary file, then move it into place in one step.

    An interrupted run therefore never leaves a half-written file under the final name. With
    `overwrite=False` an existing file is never replaced (`FileExistsError` instead).
    """
    path = Path(path)
    tmp = _temporary_sibling(path)
    try:
        torch.save(obj, tmp)
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # fails if `path` exists, atomically
    except (OSError, RuntimeError) as err:  # torch.save reports a failed write as RuntimeError
        full = disk_full_message(err if isinstance(err, OSError) else _os_error_in(err), path)
        if full:
            raise UserError(full) from None
        raise
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def atomic_write_text(text: str, path) -> Path:
    """Write a text file atomically (temporary file, then rename)."""
    path = Path(path)
    tmp = _temporary_sibling(path)
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as err:
        full = disk_full_message(err, path)
        if full:
            raise UserError(full) from None
        raise
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _os_error_in(err: BaseException) -> OSError | None:
    """The OSError behind `err` (torch.save wraps a failed write in a RuntimeError)."""
    while err is not None:
        if isinstance(err, OSError):
            return err
        if "No space left on device" in str(err):
            import errno
            return OSError(errno.ENOSPC, "No space left on device")
        err = err.__cause__ or err.__context__
    return None


def atomic_write_json(obj, path) -> Path:
    return atomic_write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", path)


def safe_torch_load(path, what: str = "file"):
    """`torch.load(weights_only=True)` on the CPU, with a clear error for missing or damaged files."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for truncated/corrupt/unsafe files
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{what} {path} is corrupt, truncated or not a tensor file ({reason[:200]}); "
                        f"delete it and create it again") from None


def read_json_if_present(path) -> dict | None:
    """The JSON object in `path`, or None when there is no such file (a damaged file is a clear error)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON ({err}); delete it to start it anew") from None
