"""Output locations checked before any work starts, so that a bad path fails in the first second and
not at the first save hours later."""
from __future__ import annotations

import errno
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
