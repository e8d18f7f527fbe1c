"""Safe file I/O: atomic writes and pickle-free loads.

A file is written under a hidden temporary name beside its final one, then moved into place in one
step. The temporary name carries its writer (`.NAME~HOST~PID~RANDOM.tmp`), so that a later run can
tell the leftovers of a killed process (`remove_stale_temporaries`) from a live writer's file. Files
are created with the user's umask, like any other tool's.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import shutil
import socket
import time
from functools import partial
from pathlib import Path

import torch

from utils.cli import UserError, os_error_reason
from utils.errors import SettingError
from utils.paths import disk_full_message

# A temporary file whose writer cannot be asked (another machine, or an older name without a
# writer) counts as left over once it is this old.
STALE_AFTER_SECONDS = 24 * 3600
_OWNED = re.compile(r"~(?P<host>[^~/]*)~(?P<pid>\d+)~[^~/]*\.tmp$")


def owner_tag() -> str:
    """`HOST~PID` of this process, as temporary and partial file names carry it."""
    return f"{socket.gethostname()}~{os.getpid()}"


def owner_is_gone(host: str, pid: int) -> bool | None:
    """Whether the process `pid` on `host` no longer runs; None when it cannot be known (another host).

    This process itself counts as gone: at the start of a run nothing of its own is being written, so
    what it finds of its own was left by an earlier, interrupted call in the same interpreter.
    """
    if host != socket.gethostname():
        return None
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # it exists, under another user
        return False
    return False


def is_stale(path: Path, host: str | None, pid: int | None) -> bool:
    """A leftover: its writer is gone, or (when the writer cannot be asked) it is older than STALE_AFTER_SECONDS."""
    gone = owner_is_gone(host, pid) if host is not None and pid is not None else None
    if gone is not None:
        return gone
    try:
        return time.time() - path.stat().st_mtime > STALE_AFTER_SECONDS
    except FileNotFoundError:
        return False


def remove_stale_temporaries(folder) -> list[Path]:
    """Delete the temporary files and folders (`.*.tmp`) in `folder` left by processes that no longer run;
    returns them.

    A live writer's temporary is never touched; one whose writer cannot be asked is removed only
    once older than STALE_AFTER_SECONDS.
    """
    removed = []
    for path in Path(folder).glob(".*.tmp"):
        owned = _OWNED.search(path.name)
        host, pid = (owned["host"], int(owned["pid"])) if owned else (None, None)
        if is_stale(path, host, pid):
            try:
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
                removed.append(path)
            except FileNotFoundError:  # another run cleaned it meanwhile
                pass
    return removed


def temporary_sibling(path, folder: bool = False) -> Path:
    """Create an empty hidden temporary file (or, with `folder`, an empty folder) beside `path`, named after its
    writer (`remove_stale_temporaries` reads the name), with the umask's mode."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = path.with_name(f".{path.name}~{owner_tag()}~{secrets.token_hex(4)}.tmp")
        try:
            if folder:
                tmp.mkdir()
            else:
                os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue


def atomic_write(path, write, *, overwrite: bool = True) -> Path:
    """Create `path` by calling `write(temporary_path)` on a hidden temporary file beside it, then moving that
    into place in one step, so an interrupted run never leaves a half-written file under the final name. With
    `overwrite=False` an existing file is never replaced (`FileExistsError` instead). A full disk is a UserError."""
    path = Path(path)
    tmp = temporary_sibling(path)
    try:
        write(tmp)
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # fails if `path` exists, atomically
    except Exception as err:  # writers report a failed write as OSError, RuntimeError (torch) or their own type
        full = disk_full_message(_os_error_in(err), path)
        if full:
            raise UserError(full) from None
        raise
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _torch_save_to(obj, tmp: Path) -> None:
    with open(tmp, "wb") as handle:  # through a handle: the archive inside is named "archive", not
        torch.save(obj, handle)      # after the random temporary name, so equal data gives equal bytes


@contextlib.contextmanager
def staged_folder(target):
    """A new temporary folder beside `target` to fill; when the block ends without an error it becomes `target` in
    one rename (what was there, an empty folder or one the caller chose to replace, is moved aside first and deleted
    after), else it is deleted: a reader never sees a half-written folder, and an interruption leaves the old one
    whole (under a temporary name at worst)."""
    target = Path(target)
    staging = temporary_sibling(target, folder=True)
    try:
        yield staging
        old = None
        if target.exists():
            old = temporary_sibling(target, folder=True)  # an empty folder: a folder may be renamed over it
            os.replace(target, old)
        os.replace(staging, target)
        if old is not None:
            shutil.rmtree(old)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def atomic_torch_save(obj, path, *, overwrite: bool = True) -> Path:
    """Write `obj` with `torch.save` atomically (`atomic_write`)."""
    return atomic_write(path, partial(_torch_save_to, obj), overwrite=overwrite)


def atomic_write_text(text: str, path) -> Path:
    """Write a text file atomically (temporary file, then rename)."""
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_bytes(data: bytes, path, *, overwrite: bool = True) -> Path:
    """Write a binary file atomically (temporary file, then rename)."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data), overwrite=overwrite)


def _os_error_in(err: BaseException) -> OSError | None:
    """The OSError behind `err` (torch.save wraps a failed write in a RuntimeError)."""
    while err is not None:
        if isinstance(err, OSError):
            return err
        if "No space left on device" in str(err):
            return OSError(errno.ENOSPC, "No space left on device")
        err = err.__cause__ or err.__context__
    return None


def atomic_write_json(obj, path) -> Path:
    return atomic_write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", path)


def _tensor_file_start(path: Path) -> bool:
    """Whether `path` begins as torch.save writes: a zip archive (PK), or a pickle (0x80) in the legacy format.
    An empty or unreadable file counts as one (damaged), for torch.load to report."""
    try:
        with open(path, "rb") as file:
            start = file.read(2)
    except OSError:
        return True
    return not start or start.startswith((b"PK", b"\x80"))


def safe_torch_load(path, what: str = "file", mmap: bool = False):
    """`torch.load(weights_only=True)` on the CPU, with a clear error for missing or damaged files.

    `mmap=True` maps the tensors' storage instead of reading it (cheap when only shapes are needed). What the
    tensors hold is the caller's to check (`tensor_problem`, `as_float32`)."""
    path = Path(path)
    try:
        found = path.is_file()
    except (OSError, ValueError) as err:  # a name too long, a NUL byte, ...
        reason = os_error_reason(err) if isinstance(err, OSError) else "the path holds a NUL byte"
        raise UserError(f"{what} {path} cannot be read: {reason}") from None
    if not found:
        raise UserError(f"{what} {path} is a folder, not a file" if path.is_dir() else f"{what} not found: {path}")
    if not _tensor_file_start(path):  # e.g. a JSON or text file given by mistake: not damaged, so not to be deleted
        raise UserError(f"{what} {path} is not a tensor file (a .pt file written by this project); check the path")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # torch raises many types for truncated/corrupt/unsafe files
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{what} {path} is corrupt, truncated or not a tensor file ({reason[:200]}); "
                        f"delete it and create it again") from None


def load_cache(path, what: str):
    """The payload of the cache file `path` (`what` names it), or None when there is none or it cannot be loaded
    (then the caller computes it again; a note says why). A path the system refuses is an error of the cache_dir
    setting, under which every cache lies."""
    path = Path(path)
    try:
        if not path.is_file():
            return None
    except OSError as err:
        raise SettingError("cache_dir", str(path), f"the {what} {path} cannot be read: {os_error_reason(err)}; "
                                                   f"choose a cache folder that can be read") from None
    try:
        return safe_torch_load(path, what)
    except UserError as err:
        print(f"note: {err}; computing it again")
        return None


# Loaded tensor values beyond this magnitude are refused: far above anything training writes (normalised
# pixels lie within a few units, learned pixels and text embeddings within a few hundred), and far enough
# below float32's largest number (3.4e38) that the sums of squares inside a model stay finite (1e30 does not).
MAX_ABS_VALUE = 1e8


def tensor_problem(value, dims: int | None = None, max_abs: float | None = None) -> str | None:
    """What makes a loaded `value` unusable as floating-point data, as a phrase (None: nothing): not a tensor,
    not floating point (any floating dtype is fine: `as_float32` converts it), another number of dimensions
    than `dims`, a NaN or an infinity, or a value beyond +-`max_abs`."""
    if not isinstance(value, torch.Tensor):
        return f"is {type(value).__name__!r}, not a tensor"
    if not value.is_floating_point():
        return f"holds {str(value.dtype).removeprefix('torch.')} values, not floating-point numbers"
    if dims is not None and value.dim() != dims:
        return f"has shape {tuple(value.shape)}, not {dims} dimensions"
    finite = torch.isfinite(value)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        return f"has {bad} NaN or infinite value{'s' if bad > 1 else ''} (of {value.numel()})"
    if max_abs is not None and value.numel() and float(value.abs().max()) > max_abs:
        return (f"holds values up to {float(value.abs().max()):.3g} in magnitude, beyond the bound +-{max_abs:g} "
                f"(larger values overflow a model's float32 sums into NaN)")
    return None


def as_float32(value):
    """`value` with every floating-point tensor inside it (dicts, lists and tuples searched) as float32: files
    written in float16, bfloat16 or float64 load as the float32 the models compute in."""
    if isinstance(value, torch.Tensor):
        return value.float() if value.is_floating_point() and value.dtype != torch.float32 else value
    if isinstance(value, dict):
        return {key: as_float32(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        items = [as_float32(item) for item in value]
        return items if isinstance(value, list) else tuple(items)
    return value


def read_json_if_present(path) -> dict | None:
    """The JSON object in `path`, or None when there is no such file (a damaged file is a clear error)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise UserError(f"{path} cannot be read: {os_error_reason(err)}") from None
    except (ValueError, RecursionError) as err:  # invalid JSON, bytes that are not UTF-8, nesting too deep
        reason = "nested too deeply" if isinstance(err, RecursionError) else str(err)
        raise UserError(f"{path} is not valid JSON ({reason}); delete it to start it anew") from None
