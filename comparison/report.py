"""What the pipeline writes once every row is judged (comparison/pipeline.py): results.md and results.json (each
row's metrics, worth-N and choices), worth_n.png, with [compare] budgets table.md (the papers' layout, r_mean with
worth-N per size, and what each distillation cost) and budgets.png, the first seed's images and captions, and the
summary printed at the end (every row against the distilled set, and what each set is worth in random real pairs).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from comparison.config import (BASE, BASE_ROWS, budgets_of, compare_setting, distill_runs, method_names,
                               selection_split, set_sizes)
from comparison.rows import Kind, Row
from comparison.stages import banner, distill_timing, seconds_per_iteration
from data.distilled_set import load_distilled_set
from evaluation.budgets import cell, paper_table, plot_budgets, r_mean_table
from evaluation.metrics import format_table, markdown_table, table_cells
from evaluation.worth import plot_worth, worth_n
from settings.choices import CENTROIDS, RANDOM


def choice_text(report: dict, key: str, spec: str) -> str:
    """A report's chosen learning rate or epochs for the table: one value, or one per pooled part."""
    value = report.get(key)
    values = value if isinstance(value, list) else [value]
    return ", ".join(format(v, spec) for v in values if v is not None)


def full_row(rows: list[Row]) -> Row:
    return next(row for row in rows if row.kind is Kind.FULL)


def ladder_points(rows: list[Row]) -> dict[int, dict]:
    """N -> r_mean summary of the random coresets of the ladder, with full-data training (when it was a run of its
    own, not read off the experts) as the last rung."""
    return {row.report["config"]["set_size"]: row.report["metrics"]["r_mean"] for row in rows
            if row.on_ladder and "config" in row.report}


def worth_column(rows: list[Row]) -> dict[str, dict | None]:
    """Label -> the row's worth-N on the ladder (None for the rungs and random coresets, or without a ladder)."""
    points = ladder_points(rows)
    if len(points) < 2:
        return {row.label: None for row in rows}
    return {row.label: worth_n(points, row.report["metrics"]["r_mean"]["mean"],
                               row.report["metrics"]["r_mean"]["std"]).as_dict() if row.gets_worth else None
            for row in rows}


def write_outputs(out: Path, distilled: Path | None, rows: list[Row], times: dict[str, float], config: dict,
                  run_seconds: dict[str, float] | None = None) -> None:
    """Everything the pipeline writes from the judged `rows` (in the table's order); `distilled`: the set whose
    images and nearest captions are copied beside the table."""
    summaries = {row.label: row.report["metrics"] for row in rows}
    worth = worth_column(rows)
    full = full_row(rows).report["metrics"]["r_mean"]
    header, cells = table_cells(summaries)
    lines = [cells_of_row + ["" if worth[row.label] is None else worth[row.label]["text"],
                             choice_text(row.report, "lr", ".3g"), choice_text(row.report, "epochs", "d")]
             for cells_of_row, row in zip(cells, rows)]
    split = next((row.report.get("split") for row in rows if row.report.get("split")), "?")
    table = markdown_table(header + ["worth-N", "lr", "epochs"], lines)
    edges = {row.label: row.report["at_edge"] for row in rows if row.report.get("at_edge")}
    edge_note = ("\n\nChoices still at an edge of the grid after widening: " +
                 "; ".join(f"{label} ({', '.join(dims)})" for label, dims in edges.items()) + ".") if edges else ""
    (out / "results.md").write_text(f"Reported on the {split} split; choices on "
                                    f"{selection_split(config)}.\n\n{table}{edge_note}\n")
    points = ladder_points(rows)
    (out / "results.json").write_text(json.dumps(
        {"split": split, "rows": summaries, "worth_n": worth, "ladder": {str(k): v for k, v in points.items()},
         "choices": {row.label: {key: row.report.get(key) for key in ("lr", "epochs", "tuning", "widened", "at_edge")}
                     for row in rows},
         "stage_seconds": times, "distillation_seconds": run_seconds or {},
         "kinds": {row.label: row.record() for row in rows}}, indent=1))
    marked = {row.label: row.report["metrics"]["r_mean"] for row in rows
              if worth.get(row.label) is not None and not row.single_seed}
    plot = None
    if len(points) >= 2:
        plot = plot_worth(points, marked, out / "worth_n.png", title=f"r_mean on {split} against random real pairs",
                          full=full)
    if budgets_of(config) is not None:
        budgets_plot = write_budget_table(out, rows, worth, points, full, split, config)
        print(f"wrote {out / 'table.md'}, {budgets_plot}")
    if distilled is not None and distilled.is_file():
        tag = f"{load_distilled_set(distilled)['iteration']:06d}"
        for name in (f"synthetic_images_plain_{tag}.png", f"synthetic_images_clipped_{tag}.png",
                     f"nearest_captions_{tag}.txt"):
            if (distilled.parent / name).is_file():
                shutil.copyfile(distilled.parent / name, out / name.replace(f"_{tag}", ""))
    banner(f"results on {split} (mean ± std over evaluation models; choices on "
           f"{selection_split(config)})")
    print(format_table(summaries))
    print(verdict(rows, worth))
    print("\n" + ", ".join(f"{k} {v / 60:.1f} min" for k, v in times.items()) +
          f"; total {sum(times.values()) / 60:.1f} min")
    print(f"wrote {out / 'results.md'}, {out / 'results.json'}" + (f", {plot}" if plot else ""))


def budget_rows(rows: list[Row], config: dict) -> dict[str, dict[int, Row]]:
    """The budget table's rows by set size: each method's distilled sets (pooled over the seeds when there are
    several; the base method's named "distilled"), then the coresets of each size (random ones from the ladder)."""
    coresets = [RANDOM, *compare_setting(config, "coreset_methods"),
                *([CENTROIDS] if compare_setting(config, "centroids") else [])]
    wanted = [(name, True) for name in method_names(config)] + [(name, False) for name in coresets]
    table = {}
    for name, distilled in wanted:
        for size in set_sizes(config):
            found = [row for row in rows if row.method == name and row.size == size
                     and (row.kind is Kind.DISTILLED) == distilled]
            chosen = next((row for row in found if row.seeds > 1), found[0] if found else None)
            if chosen is not None:
                table.setdefault(BASE_ROWS if distilled and name == BASE else name, {})[size] = chosen
    return table


def write_budget_table(out: Path, rows: list[Row], worth: dict[str, dict | None], points: dict[int, dict],
                       full: dict, split: str, config: dict) -> Path:
    """table.md (the papers' layout, then r_mean with worth-N per size) and budgets.png (r_mean against pairs)."""
    sizes, chosen = set_sizes(config), budget_rows(rows, config)
    metrics = {name: {size: row.report["metrics"] for size, row in by_size.items()} for name, by_size in chosen.items()}
    worth_text = {name: {size: worth[row.label]["text"] for size, row in by_size.items() if worth.get(row.label)}
                  for name, by_size in chosen.items()}
    text = (f"Reported on the {split} split (choices on {selection_split(config)}); mean ± std over "
            f"the evaluation models (distilled rows: pooled over the seeds). Full data: {cell(full)}.\n\n"
            f"{paper_table(metrics, sizes)}\n\nr_mean, and what each set is worth in random real pairs:\n\n"
            f"{r_mean_table(metrics, sizes, worth_text)}\n\nWhat each set cost on this machine:\n\n"
            f"{cost_table(out, rows, config)}\n")
    (out / "table.md").write_text(text)
    return plot_budgets(metrics, out / "budgets.png", points, full, title=f"r_mean on {split} against the set size")


def cost_table(out: Path, rows: list[Row], config: dict) -> str:
    """Markdown: per distillation (method, size, seed) its matching seconds per iteration and minutes (timing.json,
    the evaluations during distillation excluded) and the minutes its row's evaluation took (the report's wall
    time), as measured when each ran (a run shared with other work on the machine is slower)."""
    reports = {row.label: row.report for row in rows}
    lines = []
    for item in distill_runs(config):
        final = out / "distill" / item.folder / "distilled_last.pt"
        timing = distill_timing(final)
        judged = reports.get(item.label, {}).get("wall_seconds")
        lines.append([item.label, str(timing.get("iterations", "")),
                      f"{seconds_per_iteration(final):.2f}" if timing else "",
                      f"{timing['seconds'] / 60:.1f}" if timing else "", f"{judged / 60:.1f}" if judged is not None else ""])
    return markdown_table(["distillation", "iterations", "s / iteration", "matching, min", "row's evaluation, min"],
                          lines)


def margin(ours: dict, other: dict) -> str:
    """How far one r_mean summary lies above another: in units of the larger std, or in r_mean points when
    neither has any spread (a single model, or identical runs), where a ratio would be meaningless."""
    difference, spread = ours["mean"] - other["mean"], max(ours["std"], other["std"])
    if spread > 0:
        return f"{difference / spread:+.1f} std"
    return f"{difference:+.2f} points (no spread: both std 0)"


def verdict(rows: list[Row], worth: dict[str, dict | None]) -> str:
    """The base method's first distilled row against every row that is not the base method's, and what each set
    (but a single seed's distilled row) is worth in random real pairs."""
    base = next((row for row in rows if row.base_distilled), None)
    lines = []
    if base is not None:
        name, ours = base.label, base.report["metrics"]["r_mean"]
        for row in rows:
            if row.base_distilled:
                continue
            other = row.report["metrics"]["r_mean"]
            lines.append(f"{name} r_mean {ours['mean']:.2f} vs {row.label} {other['mean']:.2f}: {margin(ours, other)}")
    for row in rows:
        if worth.get(row.label) is not None and not row.single_seed:
            lines.append(f"{row.label} is worth {worth[row.label]['text']} random real pairs")
    return "\n".join(lines)
