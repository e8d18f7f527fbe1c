"""What reduce.py says about a reduction besides the kept pairs: counts, clusters and scores, as JSON and as a
picture (the score distribution of the kept and the dropped pairs, and how many of each cluster stayed)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from reduction.select import Selection
from utils.io import atomic_write, atomic_write_json


def summary(selection: Selection, total: int, keep: float, method: str, features_info: dict) -> dict:
    """The report's content: how many pairs went in and stayed, each stage's counts, the clusters' counts and the
    score of the last method (quantiles of the kept and the dropped pairs)."""
    kept = np.zeros(total, dtype=bool)
    kept[selection.kept] = True
    report = {"method": method, "keep": keep, "pairs": total, "kept": int(kept.sum()), "stages": selection.stages,
              "options": selection.options, "features": features_info}
    if selection.clusters is not None:
        seen = selection.clusters >= 0  # (-1: a pair removed before the clustering stage)
        sizes = np.bincount(selection.clusters[seen], minlength=int(selection.clusters.max()) + 1)
        stayed = np.bincount(selection.clusters[seen & kept], minlength=len(sizes))
        report["clusters"] = {"count": int(len(sizes)), "sizes": sizes.tolist(), "kept": stayed.tolist()}
    if selection.scores is not None:
        report["scores"] = {side: _quantiles(selection.scores[mask]) for side, mask in (("kept", kept), ("dropped", ~kept))}
    return report


def _quantiles(values: np.ndarray) -> dict | None:
    values = values[np.isfinite(values)]
    if not len(values):
        return None
    q = np.quantile(values, [0.0, 0.25, 0.5, 0.75, 1.0])
    return {"min": float(q[0]), "q25": float(q[1]), "median": float(q[2]), "q75": float(q[3]), "max": float(q[4]),
            "mean": float(values.mean())}


def write_report(report: dict, selection: Selection, out: Path) -> tuple[Path, Path]:
    """OUT.report.json and OUT.report.png beside the kept pairs, each written whole or not at all."""
    json_path, png_path = out.with_name(out.name + ".report.json"), out.with_name(out.name + ".report.png")
    atomic_write_json(report, json_path)
    atomic_write(png_path, lambda tmp: _plot(report, selection, tmp))
    return json_path, png_path


def _plot(report: dict, selection: Selection, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [name for name in ("scores", "clusters") if name in report]
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(6 * max(1, len(panels)), 4), squeeze=False)
    axes = axes[0]
    if "scores" in panels:
        ax = axes[panels.index("scores")]
        kept = np.zeros(report["pairs"], dtype=bool)
        kept[selection.kept] = True
        scores = selection.scores.astype(np.float64)
        finite = np.isfinite(scores)
        bins = np.histogram_bin_edges(scores[finite], bins=60) if finite.any() else 10
        ax.hist(scores[finite & ~kept], bins=bins, alpha=0.6, label=f"dropped ({int((~kept).sum()):,})")
        ax.hist(scores[finite & kept], bins=bins, alpha=0.6, label=f"kept ({int(kept.sum()):,})")
        ax.set_xlabel(f"score of {report['method'].split('+')[-1]}")
        ax.set_ylabel("pairs")
        ax.legend()
    if "clusters" in panels:
        ax = axes[panels.index("clusters")]
        sizes, stayed = np.array(report["clusters"]["sizes"]), np.array(report["clusters"]["kept"])
        order = np.argsort(-sizes, kind="stable")
        ax.bar(np.arange(len(sizes)), sizes[order], width=1.0, alpha=0.5, label="pairs")
        ax.bar(np.arange(len(sizes)), stayed[order], width=1.0, alpha=0.8, label="kept")
        ax.set_xlabel("cluster (largest first)")
        ax.set_ylabel("pairs")
        ax.legend()
    fig.suptitle(f"{report['method']}: kept {report['kept']:,} of {report['pairs']:,} pairs ({report['keep']:g})")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)
