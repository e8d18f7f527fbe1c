"""Command-line plumbing shared by the three scripts.

`UserError` (utils/errors.py) is the one exception type that means "the user asked for something that cannot
work"; `run_cli`, the one boundary every program goes through, turns it into a single ``error: ...`` line and
exit status 2 instead of a traceback. Its kind `SettingError`, raised by the library with a settings field name
and no flag in its message, becomes ``error: --FIELD: MESSAGE``: flags are worded here, at the command line.
`run_cli` also gives one line for the errors that can only come from what the user gave, where no code nearer
the input named it first: a path the system refuses (OSError naming a file), a NUL byte in a path, a file that
is not UTF-8 text, JSON nested too deeply. Anything else is a bug in vl-distill: its traceback is printed and
followed by a line that says so (exit status 1).
"""
from __future__ import annotations

import argparse
import difflib
import errno
import os
import signal
import threading
import sys
import traceback
from pathlib import Path
from typing import Callable, Iterable

from utils.errors import SettingError, UserError  # (UserError is imported from here by most of the project)


def str2bool(value) -> bool:
    """Parse the boolean spellings researchers type (`True`, `false`, `1`, `no`, ...)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in {"true", "t", "yes", "y", "1"}:
        return True
    if text in {"false", "f", "no", "n", "0"}:
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {value!r}")


def suggestion(word: str, choices: Iterable[str], valid: Iterable[str] | None = None) -> str:
    """The end of an "unknown name" message: `; did you mean 'x'?` naming the choice nearest to `word`; when no
    choice is near, ` (valid keys: a, b, ...)` listing `valid` if given, else nothing."""
    near = difflib.get_close_matches(word, list(choices), n=1)
    if near:
        return f"; did you mean {near[0]!r}?"
    return "" if valid is None else f" (valid keys: {', '.join(valid)})"


def add_bool_flag(parser, name: str, default: bool, help: str) -> None:
    """`--name True/False`; a bare `--name` means True (so `--decay` and `--decay True` both work)."""
    parser.add_argument(name, type=str2bool, nargs="?", const=True, default=default,
                        metavar="True|False", help=help)


def flag(field: str) -> str:
    """The command-line flag of a settings field: `--` and the field's name (settings/base.py gives every field
    that flag; aliases are other spellings of it)."""
    return f"--{field}"


def flag_message(err: SettingError) -> str:
    """A SettingError as the programs word it: the flag, then the message (and the flags of `see_also`)."""
    related = f" (see also {', '.join(flag(name) for name in err.see_also)})" if err.see_also else ""
    return f"{flag(err.field)}: {err.message}{related}"


_RAISED_AS = ("UserError:", "utils.cli.UserError:", "utils.errors.UserError:", "SettingError:",
              "utils.errors.SettingError:")


def user_message(err: BaseException) -> str:
    """The one-line message of a UserError (a SettingError's naming its flag), also when a DataLoader worker
    re-raised it with its traceback."""
    text = flag_message(err) if isinstance(err, SettingError) else str(err)
    lines = [line for line in text.splitlines() if line.strip()]
    if len(lines) > 1 and "Traceback" in text:
        last = lines[-1]
        return last.split(": ", 1)[1] if last.startswith(_RAISED_AS) else last
    return text.replace("\r", "\\r").replace("\n", "\\n")  # one line, also when a path given holds a line break


def _terminate(signum, frame):
    raise KeyboardInterrupt


NAME_MAX = 255  # bytes in one path component on the common Linux and macOS file systems

# Why an operation on a path failed, in words a user can act on (by errno; others use the system's words).
_REASONS = {
    errno.EACCES: "permission denied: fix the permissions or choose another path",
    errno.EPERM: "operation not permitted: fix the permissions or choose another path",
    errno.EISDIR: "it is a folder, where a file is expected",
    errno.ENOENT: "no such file or folder",
    errno.EROFS: "the file system is read-only: choose another path",
    errno.ELOOP: "too many levels of symbolic links (a link loop?)",
    errno.ENOSPC: "the disk is full: free space, then run the command again",
    errno.EDQUOT: "the disk quota is exceeded: free space, then run the command again",
    errno.EMFILE: "too many open files: raise the limit (ulimit -n) or use fewer --num_workers",
    errno.ENFILE: "too many open files on this machine",
    errno.ENOMEM: "out of memory",
}
# Errors of the machine's resources rather than of one path: still the user's to fix, not a bug.
_RESOURCES = (errno.ENOSPC, errno.EDQUOT, errno.EMFILE, errno.ENFILE, errno.ENOMEM)


def _file_in_the_way(path: Path) -> Path | None:
    """The first ancestor of `path` that exists and is not a folder (what ENOTDIR means), if any."""
    for parent in reversed(path.parents):
        try:
            if parent.exists() and not parent.is_dir():
                return parent
        except OSError:
            return None
    return None


def os_error_reason(err: OSError) -> str:
    """Why the system refused an operation on a path, in a few words (no file name)."""
    name = Path(os.fsdecode(err.filename)) if isinstance(err.filename, (str, bytes, os.PathLike)) else None
    if err.errno == errno.ENAMETOOLONG:
        longest = max(name.parts, key=lambda part: len(os.fsencode(part))) if name and name.parts else ""
        size = len(os.fsencode(longest))
        if size > NAME_MAX:
            return (f"a path component is longer than the file system allows ({longest[:24]}... is {size} bytes, "
                    f"the limit is usually {NAME_MAX}): shorten it")
        return "the path is longer than the system allows: shorten it"
    if err.errno == errno.ENOTDIR:
        blocking = _file_in_the_way(name) if name else None
        return (f"{blocking} is a regular file, so nothing can lie under it: choose a path whose folders are folders"
                if blocking else "a part of the path that should be a folder is a regular file")
    return _REASONS.get(err.errno) or err.strerror or str(err)


def input_error_message(err: BaseException) -> str | None:
    """The one-line message for an exception that can only come from what the user gave (see the module
    docstring); None when it is not one of those (then it is a bug)."""
    if isinstance(err, OSError) and (err.filename is not None or err.errno in _RESOURCES):
        names = [os.fsdecode(n) for n in (err.filename, err.filename2) if isinstance(n, (str, bytes, os.PathLike))]
        where = " -> ".join(names)
        return f"{where}: {os_error_reason(err)}" if where else os_error_reason(err)
    if isinstance(err, UnicodeDecodeError):
        return (f"a file given holds bytes that are not UTF-8 text (byte {err.object[err.start:err.start + 1]!r} at "
                f"position {err.start}): save it as UTF-8")
    if isinstance(err, ValueError) and "embedded null" in str(err):
        return "a path given holds a NUL byte (\\0), which no file name can contain: remove it"
    if isinstance(err, RecursionError) and _raised_in_json(err):
        return "a JSON file given is nested too deeply to read (thousands of [ or {): it is damaged or not such a file"
    return None


def _raised_in_json(err: BaseException) -> bool:
    frames = traceback.extract_tb(err.__traceback__)
    return bool(frames) and f"{os.sep}json{os.sep}" in frames[-1].filename


BUG = ("this is a bug in vl-distill, not a problem with your input: please report it, with the command and the "
       "traceback above")


def _interrupted_while_starting(kind, value, tb) -> None:
    """sys.excepthook while a program loads its libraries (before `run_cli`): Ctrl-C is one line."""
    if issubclass(kind, KeyboardInterrupt) and not hasattr(sys, "ps1"):  # (not in an interactive session)
        print("interrupted while starting: nothing was written", file=sys.stderr)
        return
    sys.__excepthook__(kind, value, tb)


if sys.excepthook is sys.__excepthook__:  # programs import this module first, before torch and the rest
    sys.excepthook = _interrupted_while_starting


def _ignore(signum, frame) -> None:
    """A handler that does nothing (not SIG_IGN, which the processes a program starts would inherit)."""


def run_cli(main: Callable[[], int | None]) -> None:
    """Run a script's `main`, reporting `UserError` (a `SettingError` as ``--FIELD: message``) and the input
    errors of `input_error_message` as one line on stderr with exit status 2, and any other exception as a bug
    (traceback, then a line saying so; status 1).
    SIGTERM (sent by torchrun to the other processes when one fails, and by SLURM before it ends a job) stops
    the program as Ctrl-C does: what it was doing is saved first."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
    if sys.excepthook is _interrupted_while_starting:
        sys.excepthook = sys.__excepthook__
    try:
        status = main()
    except UserError as err:  # a SettingError among them: user_message puts its flag first
        print(f"error: {user_message(err)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        if threading.current_thread() is threading.main_thread():  # a second Ctrl-C must not break the clean-up
            signal.signal(signal.SIGINT, _ignore)                   # that runs as the interpreter exits
        print("interrupted: everything saved so far is complete and reloadable", file=sys.stderr)
        sys.exit(130)
    except Exception as err:  # noqa: BLE001 (the boundary: every exception ends here, as one line or as a bug)
        message = input_error_message(err)
        if message is None:
            traceback.print_exc()
            print(f"error: {BUG}", file=sys.stderr)
            sys.exit(1)
        print(f"error: {user_message(UserError(message))}", file=sys.stderr)
        sys.exit(2)
    sys.exit(status or 0)
