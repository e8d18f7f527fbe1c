"""Coreset baselines and full-data training, each through evaluate.py in its own process.

    python -m bench.bench_coresets --out_dir DIR [--sizes 100 1000] [--methods ...] [--full]
        [--epochs_per_size 1000=10] [--full_epochs 3] [--distilled LABEL=PATH ...] -- EVALUATE_FLAGS

Everything after `--` goes to every evaluate.py call (data set, encoders, image size, buffer, number
of evaluation models, ...). Each configuration writes DIR/<label>.json and its log; a configuration
whose JSON exists is not run again, so an interrupted benchmark continues where it stopped. The
last step writes DIR/table.md: IR@1/5/10, TR@1/5/10, r_mean (mean ± std over the evaluation
models) and the wall time of each configuration.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from comparison.programs import run_configuration
from evaluation.coresets import METHODS
from evaluation.metrics import markdown_table, table_cells


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", required=True, help="where the JSON files, logs, coresets and table go")
    parser.add_argument("--sizes", type=int, nargs="*", default=[100, 1000], help="coreset sizes")
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS, help="coreset methods")
    parser.add_argument("--full", action="store_true", help="also train on the full training split")
    parser.add_argument("--full_epochs", type=int, default=None, help="--epoch_eval_train of the full-data runs")
    parser.add_argument("--epochs_per_size", nargs="*", default=[], metavar="N=E",
                        help="--epoch_eval_train E for coresets of N pairs (CPU budgets)")
    parser.add_argument("--distilled", nargs="*", default=[], metavar="LABEL=PATH",
                        help="distilled sets to evaluate in the same table")
    parser.add_argument("evaluate_flags", nargs=argparse.REMAINDER, help="after --: flags for every evaluate.py call")
    args = parser.parse_args(argv)
    if args.evaluate_flags[:1] == ["--"]:
        args.evaluate_flags = args.evaluate_flags[1:]
    return args


def configurations(args) -> list[tuple[str, list[str]]]:
    """(label, evaluate.py flags) of every configuration, distilled sets first, full data last."""
    epochs = dict(item.split("=", 1) for item in args.epochs_per_size)
    out = Path(args.out_dir)
    configs = []
    for item in args.distilled:
        label, path = item.split("=", 1)
        configs.append((label, ["--distilled", path]))
    for size in args.sizes:
        for method in args.methods:
            flags = ["--coreset", method, "--num_queries", str(size),
                     "--coreset_file", str(out / "coresets" / f"{method}_{size}.pt")]
            if str(size) in epochs:
                flags += ["--epoch_eval_train", epochs[str(size)]]
            configs.append((f"{method}-{size}", flags))
    if args.full:
        configs.append(("full", ["--full"] + (["--epoch_eval_train", str(args.full_epochs)] if args.full_epochs else [])))
    return configs


def results_table(reports: dict[str, dict]) -> str:
    header, cells = table_cells({label: r["metrics"] for label, r in reports.items()})
    rows = [row + [str(r["config"]["epoch_eval_train"]), str(r["config"]["num_eval"]), f"{r['wall_seconds'] / 60:.1f} min"]
            for row, r in zip(cells, reports.values())]
    return markdown_table(header + ["epochs", "models", "wall time"], rows)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out_dir)
    (out / "coresets").mkdir(parents=True, exist_ok=True)
    started = time.time()
    reports = {label: run_configuration(label, flags, args.evaluate_flags, out)
               for label, flags in configurations(args)}
    table = results_table(reports)
    (out / "table.md").write_text(table + "\n")
    print(table)
    print(f"total {(time.time() - started) / 60:.1f} min this invocation; table -> {out / 'table.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
