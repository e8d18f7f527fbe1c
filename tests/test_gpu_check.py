"""bench/gpu_check.sh, the machine check a GPU user runs, in its CPU size: every program of the pipeline
runs under it (each matching mode, torchrun with two gloo processes, evaluate.py) and the table comes out."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_gpu_check_script_runs_in_ci_size(tiny_shapes, tmp_path):
    done = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--size", "ci", "--processes", "2",
                           "--image_root", str(tiny_shapes), "--device", "cpu", "--work_dir", str(tmp_path)],
                          cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ") and "n/a (CPU)" in line]
    assert [row.split(" | ")[0:2] for row in rows] == [["| unroll", "1"], ["| exact_lowmem", "1"], ["| tesla", "1"],
                                                       ["| exact_lowmem", "2"]]
    assert (tmp_path / "evaluate.json").exists() and "every program ran" in done.stdout
