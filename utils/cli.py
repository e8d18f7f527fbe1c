"""Command-line plumbing shared by the three scripts.

`UserError` is the one exception type that means "the user asked for something that cannot work";
`run_cli` turns it into a single ``error: ...`` line and exit status 2 instead of a traceback.
"""
from __future__ import annotations

import argparse
import signal
import threading
import sys
from typing import Callable


class UserError(Exception):
    """A problem with the user's input (flags, files, data) that deserves a one-line message."""


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


def add_bool_flag(parser, name: str, default: bool, help: str) -> None:
    """`--name True/False`; a bare `--name` means True (so `--decay` and `--decay True` both work)."""
    parser.add_argument(name, type=str2bool, nargs="?", const=True, default=default,
                        metavar="True|False", help=help)


def user_message(err: BaseException) -> str:
    """The one-line message of a UserError, also when a DataLoader worker re-raised it with its traceback."""
    lines = [line for line in str(err).splitlines() if line.strip()]
    if len(lines) > 1 and "Traceback" in str(err):
        last = lines[-1]
        return last.split(": ", 1)[1] if last.startswith(("UserError:", "utils.cli.UserError:")) else last
    return str(err).replace("\r", "\\r").replace("\n", "\\n")  # one line, also when a path given holds a line break


def _terminate(signum, frame):
    raise KeyboardInterrupt


def run_cli(main: Callable[[], int | None]) -> None:
    """Run a script's `main`, reporting `UserError` as one line on stderr with exit status 2. SIGTERM (sent by
    torchrun to the other processes when one fails, and by SLURM before it ends a job) stops the program as
    Ctrl-C does: what it was doing is saved first."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
    try:
        status = main()
    except UserError as err:
        print(f"error: {user_message(err)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: everything saved so far is complete and reloadable", file=sys.stderr)
        sys.exit(130)
    sys.exit(status or 0)
