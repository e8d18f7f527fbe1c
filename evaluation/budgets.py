"""The comparison over set sizes, as papers print it: sets as rows, sizes as column groups, and a plot of r_mean
against the number of pairs.

Both take `rows`: row name (e.g. "distilled", "kmeans", "random") -> set size -> the metric summary of that set
(`evaluation.metrics.summarize_runs`: metric -> {"mean", "std", "runs"}). A row need not have every size; a missing
cell is printed as "–" and left out of the plot.
"""
from __future__ import annotations

from pathlib import Path

from evaluation.metrics import _display_keys, markdown_table
from evaluation.worth import DPI, finish_r_mean_plot

MISSING = "–"
FIGSIZE = (7.5, 5.0)  # inches of the plot, at evaluation.worth's DPI


def cell(summary: dict | None) -> str:
    return MISSING if summary is None else f"{summary['mean']:.2f} ± {summary['std']:.2f}"


def paper_table(rows: dict[str, dict[int, dict]], sizes: list[int]) -> str:
    """Markdown: one line per row name; per size the recalls (IR@K, TR@K) and r_mean as mean ± std."""
    any_summary = next(summary for by_size in rows.values() for summary in by_size.values())
    columns = _display_keys(list(any_summary))
    header = ["set"] + [f"{size}: {label}" if k == 0 else label for size in sizes
                        for k, (_, label) in enumerate(columns)]
    lines = [[name] + [cell(by_size[size][key]) if size in by_size else MISSING for size in sizes
                       for key, _ in columns]
             for name, by_size in rows.items()]
    return markdown_table(header, lines)


def r_mean_table(rows: dict[str, dict[int, dict]], sizes: list[int], worth: dict[str, dict[int, str]]) -> str:
    """Markdown: r_mean per row and size, with the worth-N text where given (worth[name][size])."""
    lines = []
    for name, by_size in rows.items():
        cells = []
        for size in sizes:
            text = cell(by_size[size]["r_mean"]) if size in by_size else MISSING
            extra = worth.get(name, {}).get(size)
            cells.append(text + (f" (worth {extra})" if extra and size in by_size else ""))
        lines.append([name] + cells)
    return markdown_table(["set"] + [f"{size} pairs" for size in sizes], lines)


def plot_budgets(rows: dict[str, dict[int, dict]], path, ladder: dict[int, dict] | None = None,
                 full: dict | None = None, title: str = "") -> Path:
    """r_mean (mean, error bar ± std) against the number of pairs on a log axis: one line per row name, the
    random ladder (`ladder`: N -> r_mean summary, also at sizes beyond the table's) in black, full-data
    training (`full`: an r_mean summary) as a dotted horizontal line. Written as a PNG; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI)
    try:
        if ladder:
            sizes = sorted(ladder)
            ax.errorbar(sizes, [ladder[n]["mean"] for n in sizes], yerr=[ladder[n]["std"] for n in sizes],
                        color="black", marker="o", markersize=4, capsize=3, linewidth=1.5, label="random real pairs",
                        zorder=3)
        for k, (name, by_size) in enumerate(rows.items()):
            sizes = sorted(by_size)
            ax.errorbar(sizes, [by_size[n]["r_mean"]["mean"] for n in sizes],
                        yerr=[by_size[n]["r_mean"]["std"] for n in sizes], marker="s" if k < 10 else "^",
                        markersize=5, capsize=3, linewidth=1.2, label=name, zorder=4)
        finish_r_mean_plot(fig, ax, path, "pairs in the set", title, full)
    finally:
        plt.close(fig)
    return path
