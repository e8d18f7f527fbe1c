"""What the pipeline writes once every row is judged (comparison/pipeline.py): results.md and results.json (each
row's metrics, worth-N and choices), worth_n.png, with [compare] budgets table.md (the papers' layout, r_mean with
worth-N per size, and what each distillation cost) and budgets.png, the first seed's images and captions, and the
summary printed at the end (every row against the distilled set, and what each set is worth in random real pairs).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from comparison.config import BASE, budgets_of, distill_runs, method_names, row_name, set_sizes
from comparison.stages import banner, seconds_per_iteration
from data.distilled_set import load_distilled_set
from evaluation.budgets import cell, paper_table, plot_budgets, r_mean_table
from evaluation.metrics import format_table, markdown_table, table_cells
from evaluation.worth import plot_worth, worth_n
from utils.io import read_json_if_present

def choice_text(report: dict, key: str, spec: str) -> str:
    """A report's chosen learning rate or epochs for the table: one value, or one per pooled part."""
    value = report.get(key)
    values = value if isinstance(value, list) else [value]
    return ", ".join(format(v, spec) for v in values if v is not None)


def ladder_points(ladder: dict[str, dict], full_report: dict) -> dict[int, dict]:
    """N -> r_mean summary of the random coresets, with full-data training as the last rung."""
    points = {r["config"]["set_size"]: r["metrics"]["r_mean"] for r in ladder.values()}
    if "config" in full_report:
        points[full_report["config"]["set_size"]] = full_report["metrics"]["r_mean"]
    return points


def worth_column(reports: dict[str, dict], ladder: dict[str, dict], full_report: dict) -> dict[str, dict | None]:
    points = ladder_points(ladder, full_report)
    if len(points) < 2:
        return {label: None for label in reports}
    return {label: None if label.startswith("random-") or label.startswith("full data") else
            worth_n(points, r["metrics"]["r_mean"]["mean"], r["metrics"]["r_mean"]["std"]).as_dict()
            for label, r in reports.items()}


def write_outputs(out: Path, distilled: Path, reports: dict[str, dict], ladder: dict[str, dict], full_report: dict,
                  times: dict[str, float], config: dict, run_seconds: dict[str, float] | None = None) -> None:
    summaries = {label: r["metrics"] for label, r in reports.items()}
    worth = worth_column(reports, ladder, full_report)
    header, cells = table_cells(summaries)
    rows = [row + ["" if worth[label] is None else worth[label]["text"], choice_text(r, "lr", ".3g"),
                   choice_text(r, "epochs", "d")]
            for row, (label, r) in zip(cells, reports.items())]
    split = next((r.get("split") for r in reports.values() if r.get("split")), "?")
    table = markdown_table(header + ["worth-N", "lr", "epochs"], rows)
    edges = {label: r["at_edge"] for label, r in reports.items() if r.get("at_edge")}
    edge_note = ("\n\nChoices still at an edge of the grid after widening: " +
                 "; ".join(f"{label} ({', '.join(dims)})" for label, dims in edges.items()) + ".") if edges else ""
    (out / "results.md").write_text(f"Reported on the {split} split; choices on "
                                    f"{config['common'].get('eval_split', 'val')}.\n\n{table}{edge_note}\n")
    points = ladder_points(ladder, full_report)
    (out / "results.json").write_text(json.dumps(
        {"split": split, "rows": summaries, "worth_n": worth, "ladder": {str(k): v for k, v in points.items()},
         "choices": {label: {key: r.get(key) for key in ("lr", "epochs", "tuning", "widened", "at_edge")}
                     for label, r in reports.items()},
         "stage_seconds": times, "distillation_seconds": run_seconds or {}}, indent=1))
    marked = {label: r["metrics"]["r_mean"] for label, r in reports.items() if worth.get(label) is not None
              and "(seed" not in label}
    plot = None
    if len(points) >= 2:
        plot = plot_worth(points, marked, out / "worth_n.png", title=f"r_mean on {split} against random real pairs",
                          full=full_report["metrics"]["r_mean"])
    if budgets_of(config) is not None:
        budgets_plot = write_budget_table(out, reports, worth, points, full_report["metrics"]["r_mean"], split, config)
        print(f"wrote {out / 'table.md'}, {budgets_plot}")
    if distilled.is_file():
        tag = f"{load_distilled_set(distilled)['iteration']:06d}"
        for name in (f"synthetic_images_plain_{tag}.png", f"synthetic_images_clipped_{tag}.png",
                     f"nearest_captions_{tag}.txt"):
            if (distilled.parent / name).is_file():
                shutil.copyfile(distilled.parent / name, out / name.replace(f"_{tag}", ""))
    banner(f"results on {split} (mean ± std over evaluation models; choices on "
           f"{config['common'].get('eval_split', 'val')})")
    print(format_table(summaries))
    print(verdict(reports, worth))
    print("\n" + ", ".join(f"{k} {v / 60:.1f} min" for k, v in times.items()) +
          f"; total {sum(times.values()) / 60:.1f} min")
    print(f"wrote {out / 'results.md'}, {out / 'results.json'}" + (f", {plot}" if plot else ""))


def budget_labels(reports: dict[str, dict], config: dict) -> dict[str, dict[int, str]]:
    """The table's rows by set size, as report labels: each method's distilled sets (pooled over seeds when there
    are several), and the coresets of each size ("random" from the ladder)."""
    sizes, labels = set_sizes(config), {}
    compare = config["compare"]
    kinds = ["random", *compare.get("coreset_methods", []), *(["centroids"] if compare.get("centroids") else [])]
    names = [(method, row_name(method, size), size) for method in method_names(config) for size in sizes]
    names += [(kind, f"{kind}-{size}", size) for kind in kinds for size in sizes]
    for name, prefix, size in names:
        found = [label for label in reports if label == prefix or label.startswith(prefix + " (")]
        chosen = next((label for label in found if "seeds)" in label), found[0] if found else None)
        if chosen is not None:
            labels.setdefault("distilled" if name == BASE else name, {})[size] = chosen
    return labels


def write_budget_table(out: Path, reports: dict[str, dict], worth: dict[str, dict | None], points: dict[int, dict],
                       full: dict, split: str, config: dict) -> Path:
    """table.md (the papers' layout, then r_mean with worth-N per size) and budgets.png (r_mean against pairs)."""
    sizes, labels = set_sizes(config), budget_labels(reports, config)
    rows = {name: {size: reports[label]["metrics"] for size, label in by_size.items()} for name, by_size in labels.items()}
    worth_text = {name: {size: worth[label]["text"] for size, label in by_size.items() if worth.get(label)}
                  for name, by_size in labels.items()}
    text = (f"Reported on the {split} split (choices on {config['common'].get('eval_split', 'val')}); mean ± std over "
            f"the evaluation models (distilled rows: pooled over the seeds). Full data: {cell(full)}.\n\n"
            f"{paper_table(rows, sizes)}\n\nr_mean, and what each set is worth in random real pairs:\n\n"
            f"{r_mean_table(rows, sizes, worth_text)}\n\nWhat each set cost on this machine:\n\n"
            f"{cost_table(out, reports, config)}\n")
    (out / "table.md").write_text(text)
    return plot_budgets(rows, out / "budgets.png", points, full, title=f"r_mean on {split} against the set size")


def cost_table(out: Path, reports: dict[str, dict], config: dict) -> str:
    """Markdown: per distillation (method, size, seed) its matching seconds per iteration and minutes (timing.json,
    the evaluations during distillation excluded) and the minutes its row's evaluation took (the report's wall
    time), as measured when each ran (a run shared with other work on the machine is slower)."""
    lines = []
    for item in distill_runs(config):
        final = out / "distill" / item.folder / "distilled_last.pt"
        timing = read_json_if_present(final.parent / "timing.json") or {}
        judged = reports.get(item.label, {}).get("wall_seconds")
        lines.append([item.label, str(timing.get("iterations", "")),
                      f"{seconds_per_iteration(final):.2f}" if timing else "",
                      f"{timing['seconds'] / 60:.1f}" if timing else "", f"{judged / 60:.1f}" if judged else ""])
    return markdown_table(["distillation", "iterations", "s / iteration", "matching, min", "row's evaluation, min"],
                          lines)


def margin(ours: dict, other: dict) -> str:
    """How far one r_mean summary lies above another: in units of the larger std, or in r_mean points when
    neither has any spread (a single model, or identical runs), where a ratio would be meaningless."""
    difference, spread = ours["mean"] - other["mean"], max(ours["std"], other["std"])
    if spread > 0:
        return f"{difference / spread:+.1f} std"
    return f"{difference:+.2f} points (no spread: both std 0)"


def verdict(reports: dict[str, dict], worth: dict[str, dict | None]) -> str:
    """The distilled set against every other row, and what each set is worth in random real pairs."""
    distilled = next(((k, v["metrics"]["r_mean"]) for k, v in reports.items() if k.startswith("distilled-")), None)
    lines = []
    if distilled is not None:
        name, ours = distilled
        for label, report in reports.items():
            if label.startswith("distilled-"):
                continue
            other = report["metrics"]["r_mean"]
            lines.append(f"{name} r_mean {ours['mean']:.2f} vs {label} {other['mean']:.2f}: {margin(ours, other)}")
    for label, value in worth.items():
        if value is not None and "(seed" not in label:
            lines.append(f"{label} is worth {value['text']} random real pairs")
    return "\n".join(lines)
