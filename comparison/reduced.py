"""Reduction rows: real training pairs kept by reduce.py's methods at several fractions, judged like full data
([reduce] of a pipeline config; docs/reduction.md).

    [reduce]
    methods = ["random", "alignment", "semdedup+balanced"]   # reduce.py --method, each one a line of the table
    keep = [0.1, 0.25, 0.5]                                   # reduce.py --keep, each one a column
    reduce = { clusters = 100, epsilon = 0.05 }               # other reduce.py flags, for every call (optional)

For every method and fraction reduce.py writes out_dir/reduce/<method>-<percent>.json (the kept pairs, in the
training split's annotation layout, with the pipeline's experts as the aligned space), then evaluate.py --subset
trains on them with the protocol of every row (the learning rate and epochs chosen on the selection split, the same
grid). The number of epochs follows one rule: a fraction `keep` trains round(E / keep) epochs, E being the full-data
row's, so that every reduced row takes as many SGD steps as full data does (the grid's epoch scales apply on top).
The rows join the main table (kind "reduced", with worth-N on the random ladder); reduce.md holds them as methods ×
fractions (r_mean ± std, kept pairs, worth-N), reduce.png plots r_mean against the kept fraction, one line per method
with full data as a line, and results.json's "reduce" entry holds the numbers. One stage (stamps/reduce.json): other
reduce.py flags in [reduce], [common] or [evaluate] redo every row (its kept pairs and its report); a method or a
fraction added to the lists runs alone; the finished rows of an interrupted run are reused, and a judged row needs
only its two reports (results/reduce_<name>.json and reduce/<name>.json.report.json), not its kept pairs.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from comparison.config import FULL, compare_setting
from comparison.programs import run, run_configuration
from comparison.rows import Kind, Row
from comparison.stages import Stage, as_flags, banner
from evaluation.budgets import MISSING, cell
from evaluation.metrics import markdown_table
from evaluation.worth import DPI, finish_r_mean_plot
from settings.programs import check_section, check_together
from settings.protocol import ProtocolSettings
from settings.reduction import method_problem
from utils.cli import UserError, suggestion

FOLDER = "reduce"
REPORT = "reduce.md"
REPORT_PREFIX = "reduce_"  # results/reduce_<method>-<percent>.json: a row's evaluate.py report
KEYS = ("methods", "keep", "reduce")
PER_CALL = ("method", "keep", "out", "buffer_path", "shards", "write_shards", "features_dir", "overwrite")


def reduce_section(config: dict, where: str) -> dict | None:
    """The config's [reduce] table checked before any work (None when it has none): known keys, method names,
    fractions in (0, 1], reduce.py flags that reduce.py takes (with [common])."""
    table = config.get("reduce")
    if not table:
        return None
    where = f"{where} [reduce]"
    for key in table:
        if key not in KEYS:
            raise UserError(f"{where}: unknown key {key!r}" + suggestion(key, KEYS, KEYS))
    methods, keep = table.get("methods"), table.get("keep")
    if not isinstance(methods, list) or not methods or not all(isinstance(m, str) for m in methods) \
            or len(set(methods)) != len(methods):
        raise UserError(f"{where}: methods must list reduce.py methods, each once, e.g. [\"random\", \"balanced\"]; "
                        f"got {methods!r}")
    for method in methods:
        problem = method_problem(method)
        if problem:
            raise UserError(f"{where}: methods: {problem}")
    if not isinstance(keep, list) or not keep or len(set(keep)) != len(keep) or not all(
            isinstance(k, (int, float)) and not isinstance(k, bool) and math.isfinite(k) and 0 < k <= 1 for k in keep):
        raise UserError(f"{where}: keep must list fractions in (0, 1], each once, e.g. [0.1, 0.25, 0.5]; got {keep!r}")
    flags = table.get("reduce", {})
    if not isinstance(flags, dict):
        raise UserError(f"{where}: reduce must be a table of reduce.py flags, got {flags!r}")
    given = [key for key in flags if key in PER_CALL]
    if given:
        raise UserError(f"{where} reduce: {given[0]} is set by the pipeline for each call (methods, keep, the output "
                        f"file, the experts)")
    flags = check_section("reduce", flags, f"{where} reduce")
    check_together("reduce", {**config["common"], **flags, "keep": keep[0], "out": "x"}, where, skip=())
    return {"methods": methods, "keep": [float(k) for k in keep], "reduce": flags}


def file_name(method: str, keep: float) -> str:
    """reduce/<method>-<percent>: '+' of a combination becomes '_' (a file name), the percent as short as exact."""
    return f"{method.replace('+', '_')}-{keep * 100:g}pct"


def label(method: str, keep: float) -> str:
    return f"{method} {keep * 100:g}%"


def full_epochs(config: dict) -> int:
    """E: the full-data row's --epoch_eval_train ([compare] epochs_per_size.all, else [evaluate]'s or the default)."""
    epochs = {str(k): v for k, v in compare_setting(config, "epochs_per_size").items()}
    if FULL in epochs:
        return int(epochs[FULL])
    return int(config["evaluate"].get("epoch_eval_train", ProtocolSettings().epoch_eval_train))


def reduction_rows(config: dict, out: Path, expert_dir: Path, evaluate_flags: list[str], section: dict) -> list[Row]:
    """Every reduced row (reduce.py, then evaluate.py --subset), reused while the stage's settings are unchanged."""
    folder, results = out / FOLDER, out / "results"
    common = as_flags(config["common"]) + as_flags(section["reduce"])
    # The stamp holds what every row depends on, not the lists of methods and fractions: a method or a fraction added
    # later runs alone, beside the finished rows. Other settings delete the kept pairs and the rows' reports alike.
    Stage(out, "reduce", common + evaluate_flags, [folder, *sorted(results.glob(f"{REPORT_PREFIX}*"))],
          tail=[json.dumps({"epochs": full_epochs(config)}, sort_keys=True)]).begin()
    folder.mkdir(parents=True, exist_ok=True)
    results.mkdir(parents=True, exist_ok=True)
    banner(f"reduction: {len(section['methods'])} methods × kept fractions {section['keep']}")
    rows = []
    for method in section["methods"]:
        for keep in section["keep"]:
            name = file_name(method, keep)
            kept_file = folder / f"{name}.json"
            report_file = kept_file.with_name(kept_file.name + ".report.json")
            judged = (results / f"{REPORT_PREFIX}{name}.json").is_file()
            # a judged row needs only its report (the kept pairs are an output; a copy of the folder may leave them out)
            if not (report_file.is_file() and (judged or kept_file.is_file())):
                run("reduce.py", common + ["--method", method, "--keep", repr(keep), "--out", str(kept_file),
                                           "--buffer_path", str(expert_dir)])
            kept = json.loads(report_file.read_text())["kept"]
            epochs = max(1, round(full_epochs(config) / keep))
            report = run_configuration(f"{REPORT_PREFIX}{name}", ["--subset", str(kept_file), "--epoch_eval_train",
                                                          str(epochs)], evaluate_flags, results)
            report["keep"], report["kept_pairs"] = keep, kept
            rows.append(Row(label(method, keep), Kind.REDUCED, report, method, kept, file=f"{REPORT_PREFIX}{name}"))
    return rows


def write_reduction(out: Path, rows: list[Row], worth: dict[str, dict | None], full: Row, section: dict,
                    split: str, selection: str) -> Path:
    """reduce.md (methods × kept fractions), reduce.png, and results.json's "reduce" entry."""
    by_cell = {(row.method, row.report["keep"]): row for row in rows}
    lines = []
    for method in section["methods"]:
        cells = []
        for keep in section["keep"]:
            row = by_cell.get((method, keep))
            if row is None:
                cells.append(MISSING)
                continue
            found = worth.get(row.label)
            cells.append(f"{cell(row.report['metrics']['r_mean'])} ({row.size:,} pairs"
                         + (f", worth {found['text']}" if found else "") + ")")
        lines.append([method] + cells)
    full_metrics = full.report["metrics"]["r_mean"]
    table = markdown_table(["method"] + [f"keep {k * 100:g}%" for k in section["keep"]], lines)
    (out / REPORT).write_text(
        f"Reported on the {split} split (choices on {selection}); r_mean, mean ± std over the evaluation models, with "
        f"the pairs kept and what they are worth in random real pairs. Full data ({full.report.get('config', {}).get('set_size', '?')} "
        f"pairs): {cell(full_metrics)}. A fraction k trains round(E / k) epochs (E: full data's), so every row takes "
        f"as many SGD steps as full data.\n\n{table}\n")
    results = out / "results.json"
    record = json.loads(results.read_text()) if results.is_file() else {}
    record["reduce"] = {"methods": section["methods"], "keep": section["keep"], "split": split,
                        "rows": {row.label: {"method": row.method, "keep": row.report["keep"], "pairs": row.size,
                                             "metrics": row.report["metrics"], "worth_n": worth.get(row.label)}
                                 for row in rows}, "full": full_metrics}
    results.write_text(json.dumps(record, indent=1))
    return plot_reduction(by_cell, section, full_metrics, out / "reduce.png", f"r_mean on {split} against the kept fraction")


def plot_reduction(by_cell: dict, section: dict, full: dict, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5.0), dpi=DPI)
    for method in section["methods"]:
        points = [(keep, by_cell[(method, keep)].report["metrics"]["r_mean"]) for keep in section["keep"]
                  if (method, keep) in by_cell]
        if points:
            ax.errorbar([100 * k for k, _ in points], [s["mean"] for _, s in points],
                        yerr=[s["std"] for _, s in points], marker="o", capsize=3, label=method)
    finish_r_mean_plot(fig, ax, path, "pairs kept (% of the training split)", title, full)
    ax.minorticks_off()  # (the log axis's minor labels, 2×10^1 ..., would crowd the fractions' own)
    ax.set_xticks([100 * k for k in section["keep"]], [f"{100 * k:g}" for k in section["keep"]])
    fig.savefig(path, format="png", dpi=DPI)
    plt.close(fig)
    return path
