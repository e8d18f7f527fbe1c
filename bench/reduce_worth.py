"""Worth-N of the reduction rows of a pipeline folder that is still running (reduce.md comes when every row is in),
read on that folder's random ladder and full data; optionally also of means printed elsewhere (BENCHMARKS §20.1's
rows of a lost run).

    python -m bench.reduce_worth bench/results/flickr8k_reduce [--mean random-10=24.87 ...]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from comparison.report import ladder_points
from comparison.rows import FULL_REPORT, row_from_label
from evaluation.worth import format_worth, worth_n


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--mean", nargs="*", default=[], help="LABEL=R_MEAN pairs to read on the same ladder")
    args = parser.parse_args(argv)
    results = args.folder / "results"
    rungs = [row_from_label(path.stem, json.loads(path.read_text()))
             for path in [*results.glob("random-*.json"), results / f"{FULL_REPORT}.json"]]
    ladder = ladder_points([row for row in rungs if row is not None])
    for path in sorted(results.glob("reduce_*.json")):
        report = json.loads(path.read_text())
        r_mean = report["metrics"]["r_mean"]
        print(f"{path.stem}: {r_mean['mean']:.2f} ± {r_mean['std']:.2f}, {report['config']['set_size']} pairs, worth "
              f"{format_worth(worth_n(ladder, r_mean['mean'], r_mean['std']))}")
    for item in args.mean:
        label, value = item.split("=")
        print(f"{label}: {float(value):.2f}, worth {format_worth(worth_n(ladder, float(value)))}")


if __name__ == "__main__":
    main()
