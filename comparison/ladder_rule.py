"""How the fair ladder changed worth-N: each row's choice under the old rule and under the grid, from its tuning cells.

    python -m bench.ladder_rule outputs/flickr8k_table     (bench/ladder_rule.py runs this module's main)

Reads the evaluate.py reports of a pipeline run (out_dir/results/*.json) made with --epoch_scales and --widen_grid.
Every row's tuning cells are single models scored on the selection split (val), so both rules can be read off the
same models: the old rule is the best cell at the row's own number of epochs among the first grid's rates (what
the pipeline chose before epochs were a choice); the new rule is the best cell of all. With the random coresets
(and full data) as the ladder under each rule, every other row gets a worth-N under each rule. Numbers are one
model per cell on val: the selection scores, not the reported ones. Each report's kind of row comes from the run's
results.json (its "kinds"); a folder written before rows had kinds is read by the reports' names
(comparison/rows.py).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from comparison.rows import Kind, Row, row_from_label
from evaluation.metrics import markdown_table
from evaluation.worth import worth_n
from utils.cli import UserError
from utils.io import read_json_if_present


def rule_scores(report: dict) -> tuple[dict, dict]:
    """The (lr, epochs, r_mean) cell each rule picks from a report's tuning cells."""
    cells, config = report["tuning"], report["config"]
    own, first_grid = config["epoch_eval_train"], set(config["lr_grid"])
    old = [c for c in cells if c["epochs"] == own and c["lr"] in first_grid]
    if not old:
        raise UserError(f"{report['label']}: no tuning cell at its own {own} epochs and the first grid's rates")
    return max(old, key=lambda c: c["r_mean"]), max(cells, key=lambda c: c["r_mean"])


def judged_rows(out_dir: Path) -> dict[str, Row]:
    """Report name -> the row behind each evaluate.py report in out_dir/results that has tuning cells; its kind is
    what results.json recorded for that report, else what its name says (`row_from_label`)."""
    recorded = (read_json_if_present(out_dir / "results.json") or {}).get("kinds") or {}
    by_file = {record["file"]: (label, record) for label, record in recorded.items() if record.get("file")}
    rows = {}
    for path in sorted((out_dir / "results").glob("*.json")):
        report = json.loads(path.read_text())
        if not (isinstance(report.get("tuning"), list) and report["tuning"]):
            continue
        label, record = by_file.get(path.stem, (path.stem, None))
        row = Row.from_record(label, record, report) if record else row_from_label(path.stem, report)
        rows[path.stem] = row or Row(path.stem, Kind.CORESET, report)  # a name the pipeline never gives: a set
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="a pipeline run's output folder (its results/ holds the reports)")
    args = parser.parse_args(argv)
    rows = judged_rows(Path(args.out_dir))
    if not rows:
        raise UserError(f"no evaluate.py report with tuning cells in {Path(args.out_dir, 'results')}")
    chosen = {name: rule_scores(row.report) for name, row in rows.items()}
    ladder = {rule: {row.report["config"]["set_size"]: {"mean": chosen[name][rule]["r_mean"], "std": 0.0}
                     for name, row in rows.items() if row.on_ladder or row.random_coreset}
              for rule in (0, 1)}
    lines = []
    for name, (old, new) in chosen.items():
        worth = ["", ""]
        if rows[name].gets_worth and len(ladder[0]) >= 2:
            worth = [worth_n(ladder[rule], chosen[name][rule]["r_mean"]).as_dict()["text"] for rule in (0, 1)]
        lines.append([name, f"{old['lr']:g} / {old['epochs']}", f"{old['r_mean']:.2f}",
                      f"{new['lr']:g} / {new['epochs']}", f"{new['r_mean']:.2f}", *worth])
    print(markdown_table(["row", "old rule: lr / epochs", "r_mean (val)", "grid: lr / epochs", "r_mean (val)",
                          "worth-N, old", "worth-N, grid"], lines))
    return 0
