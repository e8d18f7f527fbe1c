"""Seconds per matching iteration of distill.py at several set sizes (and methods) on a pipeline config's experts.

    python -m bench.bench_set_sizes configs/flickr8k_table.toml --data ../shared/data/flickr8k 100:base 500:base

Each SIZE:METHOD runs distill.py for --iterations iterations with the config's settings for that method and size
(comparison/config.py), evaluations cut to one model of one epoch (timing.json excludes them anyway), one after
the other in this process, and prints seconds per iteration. The pipeline's experts must exist (pipeline.py
trains them).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from comparison.config import DEFAULT_OUT_DIR, distill_settings, load_config, method_config
from comparison.stages import as_flags, expert_folder, seconds_per_iteration
from settings.programs import Parser
from utils.cli import UserError, run_cli


def profile_distill(flags: list[str]) -> None:
    """distill.main(flags) under cProfile; prints the seconds in the iterations and in the frozen trunk's passes."""
    import contextlib
    import cProfile
    import io
    import pstats

    import distill

    profiler = cProfile.Profile()
    with contextlib.redirect_stdout(io.StringIO()):
        profiler.runcall(distill.main, flags)
    stats = pstats.Stats(profiler).stats
    seconds = {(Path(path).name, name): cumulative for (path, _, name), (_, _, _, cumulative, _) in stats.items()}
    print(f"profile: iterations {seconds['distill.py', 'step']:.1f} s, trunk forward without a graph "
          f"{seconds['trajectory.py', '__init__']:.1f} s, trunk recomputed forward and backward "
          f"{seconds['trajectory.py', 'pixel_gradient']:.1f} s", flush=True)


def main(argv=None) -> int:
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                    prog="python -m bench.bench_set_sizes")
    parser.add_argument("config")
    parser.add_argument("runs", nargs="+", help="SIZE:METHOD, e.g. 500:base")
    parser.add_argument("--data", default=None)
    parser.add_argument("--iterations", type=int, default=6)
    parser.add_argument("--profile", action="store_true", help="run distill.py in this process under cProfile and "
                                                               "print where the frozen trunk's time goes")
    args = parser.parse_args(argv)
    config = load_config(args.config, args.data)
    experts = expert_folder(Path(config.get("out_dir", DEFAULT_OUT_DIR)) / "buffers")
    with tempfile.TemporaryDirectory() as scratch:
        for run in args.runs:
            size, _, method = run.partition(":")
            if not size.isdigit() or not method:
                raise UserError(f"{run!r} is not SIZE:METHOD")
            merged = method_config(config, method, int(size))
            settings, _ = distill_settings(merged)
            settings.update({"iterations": args.iterations, "eval_it": args.iterations, "num_eval": 1,
                             "epoch_eval_train": 1, "seed": 0})
            save = Path(scratch) / run.replace(":", "-")
            began = time.time()
            flags = [*as_flags(merged["common"]), *as_flags(settings), "--buffer_path", str(experts), "--save_dir",
                     str(save), "--draw", "False", "--progress", "False"]
            if args.profile:
                profile_distill(flags)
            else:
                subprocess.run([sys.executable, "-m", "distill", *flags], check=True, stdout=subprocess.DEVNULL)
            print(f"{method} {size}: {seconds_per_iteration(save / 'distilled_last.pt'):.2f} s/iteration "
                  f"({args.iterations} iterations), wall {time.time() - began:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    run_cli(main)
