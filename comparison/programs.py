"""Running the programs (buffer.py, distill.py, evaluate.py, export.py) from the comparison jobs.

Each program runs in a process of its own (`python -m buffer ...`), in the caller's working
directory, so that relative paths mean what the user typed. One evaluate.py call per row writes
<out>/<label>.json and <label>.log; a row whose JSON exists is reused.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from utils.cli import UserError

PROGRAMS = ("buffer", "distill", "evaluate", "export", "reduce")


def launch(program: str, flags: list[str], log=None) -> int:
    """Run `program` (buffer, distill, evaluate, export or reduce; a trailing .py is accepted) with `flags`; its output goes
    to `log` (an open file) or to this process's output. Returns the exit status."""
    module = program.removesuffix(".py")
    if module not in PROGRAMS:
        raise ValueError(f"unknown program {program!r}")
    command = [sys.executable, "-m", module, *flags]
    if log is None:
        print("$ " + " ".join(command), flush=True)
    return subprocess.call(command, stdout=log, stderr=subprocess.STDOUT if log else None)


def run(program: str, flags: list[str]) -> None:
    """`launch` with the output shown; a failure is a one-line error pointing at that output."""
    code = launch(program, flags)
    if code != 0:
        raise UserError(f"{program} failed (exit {code}); the output above says why")


def run_configuration(label: str, flags: list[str], shared: list[str], out: Path) -> dict:
    """One evaluate.py row: `shared + flags`, its report in <out>/<label>.json (reused when present)."""
    result = out / f"{label}.json"
    if result.exists():
        print(f"[{label}] done before: {result}", flush=True)
        return json.loads(result.read_text())
    print(f"[{label}] evaluate.py {' '.join([*shared, *flags, '--out', str(result)])}", flush=True)
    started = time.time()
    with open(out / f"{label}.log", "w") as log:
        code = launch("evaluate", [*shared, *flags, "--out", str(result)], log)
    if code != 0:
        lines = (out / f"{label}.log").read_text(errors="replace").splitlines()
        said = [line for line in lines if line.startswith("error: ")]  # the program's own one-line reason
        why = f": {said[-1].removeprefix('error: ')}" if said else ""
        raise UserError(f"[{label}] evaluate.py failed (exit {code}){why}; see {out / f'{label}.log'}")
    report = json.loads(result.read_text())
    report["wall_seconds"] = round(time.time() - started, 1)
    result.write_text(json.dumps(report, indent=1, sort_keys=True))
    print(f"[{label}] r_mean {report['metrics']['r_mean']['mean']:.2f} ± {report['metrics']['r_mean']['std']:.2f} "
          f"in {report['wall_seconds']:.0f}s", flush=True)
    return report
