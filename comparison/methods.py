"""The paper's method against LoRS and RepBlend (+LoRS), same data, same iteration budget, one table.

    python -m bench.bench_methods configs/demo.toml                       # after (or instead of) make demo
    python -m bench.bench_methods configs/flickr8k.toml --data ../shared/data/flickr8k

Reads the pipeline's TOML file (pipeline.py): `[common]`, `[buffer]`, `[distill]` and `[evaluate]`
are every method's settings; an optional `[methods.<name>]` table per method adds `common = {...}` and
`distill = {...}` on top (defaults below). Each method gets its experts (the base experts are the
pipeline's, in the same out_dir; RepBlend trains its own, with a frozen image encoder and an image
head), distills with the same --iterations, and its best set (the iteration chosen on the selection split) is
judged by evaluate.py with the `[evaluate]` protocol, and so is its initial set (iteration 0: the real pairs it started from), so
that each method is compared with its own start. The table has IR/TR@1/5/10 and r_mean (mean ± std
over the evaluation models), the start's r_mean and the seconds per matching iteration (evaluations
excluded). Everything is reused on a re-run while its settings are unchanged (the pipeline's stage
stamps).

`--time_iterations K` measures the speeds side by side instead: after the table's runs, each method
distills K more iterations into `methods/<name>/timing/` (one after the other, in this invocation,
with a one-epoch evaluation so that little else runs), and the s / iteration column is from those
runs. Without it the column is each method's own distillation run, which may have been made at
another time, on a busier machine.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from comparison.programs import run, run_configuration
from comparison.config import DEFAULT_METHODS, distill_settings, load_config, method_config, setting_value
from comparison.stages import (as_flags, banner, distill_stage, experts_stage, forget_a_changed_set, output_folder,
                               seconds_per_iteration)
from settings.distillation import DistillSettings
from settings.programs import Parser
from evaluation.metrics import markdown_table, table_cells

def parse_args(argv=None):
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                    prog="python -m bench.bench_methods")
    parser.add_argument("config", help="the pipeline's TOML file")
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), help="methods to run, in order")
    parser.add_argument("--out_dir", default=None, help="output folder (default: out_dir in the config)")
    parser.add_argument("--data", default=None, help="image root of the data set (sets common.image_root)")
    parser.add_argument("--time_iterations", type=int, default=0,
                        help="time K fresh iterations of every method back to back for the s / iteration column "
                             "(0 = the distillation runs' own timing)")
    args = parser.parse_args(argv)
    if args.time_iterations < 0:
        parser.error(f"--time_iterations must be 0 or more, got {args.time_iterations}")
    return args


def method_experts(config: dict, name: str, out: Path) -> tuple[dict, Path]:
    """The method's settings and its expert folder (trained first if missing)."""
    settings = method_config(config, name)
    own_experts = settings["common"] != config["common"]  # other trainable parts or encoder: other experts
    return settings, experts_stage(settings, out / "methods" / name if own_experts else out)


def time_method(config: dict, name: str, out: Path, iterations: int) -> float:
    """Seconds per matching iteration of `iterations` fresh iterations (evaluations excluded)."""
    settings, expert_dir = method_experts(config, name, out)
    banner(f"timing {name}: {iterations} iterations")
    save_dir = out / "methods" / name / "timing"
    shutil.rmtree(save_dir, ignore_errors=True)
    overrides = {"iterations": iterations, "eval_it": iterations, "num_eval": 1, "epoch_eval_train": 1}
    run("distill.py", as_flags(settings["common"]) + as_flags({**distill_settings(settings)[0], **overrides})
        + ["--buffer_path", str(expert_dir), "--save_dir", str(save_dir), "--draw", "False"])
    return seconds_per_iteration(save_dir / "distilled_last.pt")


def run_method(config: dict, name: str, out: Path) -> dict:
    banner(f"method {name}")
    settings, expert_dir = method_experts(config, name, out)
    folder = out / "methods" / name
    final, _ = distill_stage(settings, folder, expert_dir)
    evaluate_flags = as_flags(settings["common"]) + as_flags(settings["evaluate"]) + ["--buffer_path", str(expert_dir)]
    best = final.parent / "distilled_best.pt"  # the iteration chosen on the selection split
    report = judge(name, best, evaluate_flags, folder / "results")
    report["seconds_per_iteration"] = seconds_per_iteration(final)
    start = final.parent / "distilled_000000.pt"  # the initial set (real pairs), same protocol: what distillation added
    report["start"] = judge(f"{name}-start", start, evaluate_flags, folder / "results")["metrics"] \
        if start.is_file() else None
    return report


def judge(label: str, distilled: Path, evaluate_flags: list[str], results: Path) -> dict:
    """evaluate.py's report on a distilled set; reused while the set is the one it judged."""
    results.mkdir(parents=True, exist_ok=True)
    forget_a_changed_set(results, label, distilled)
    return run_configuration(label, ["--distilled", str(distilled)], evaluate_flags, results)


def start_cell(start: dict | None) -> str:
    return "n/a" if start is None else f"{start['r_mean']['mean']:.2f} ± {start['r_mean']['std']:.2f}"


def main(argv=None) -> int:
    args = parse_args(argv)
    config = load_config(args.config, args.data)
    for name in args.methods:  # every method's settings checked before any work starts
        method_config(config, name)
    out = output_folder(args.out_dir, config, args.config)
    reports = {name: run_method(config, name, out) for name in args.methods}
    if args.time_iterations > 0:
        for name in args.methods:
            reports[name]["seconds_per_iteration"] = time_method(config, name, out, args.time_iterations)
    header, cells = table_cells({name: r["metrics"] for name, r in reports.items()})
    rows = [row + [start_cell(r["start"]), f"{r['seconds_per_iteration']:.2f}"]
            for row, r in zip(cells, reports.values())]
    table = markdown_table(header + ["r_mean at start", "s / iteration"], rows)
    (out / "methods.md").write_text(table + "\n")
    (out / "methods.json").write_text(json.dumps(
        {name: {"metrics": r["metrics"], "start_metrics": r["start"], "seconds_per_iteration": r["seconds_per_iteration"]}
         for name, r in reports.items()}, indent=1))
    banner(f"methods at {setting_value(config, 'distill', DistillSettings, 'num_pairs')} pairs, "
           f"{setting_value(config, 'distill', DistillSettings, 'iterations')} iterations each")
    print(table)
    print(f"wrote {out / 'methods.md'}, {out / 'methods.json'}")
    return 0

