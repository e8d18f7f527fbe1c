"""Worth-N: how many random real image-text pairs a small set is worth.

A set of pairs (a distilled set or a coreset) is judged by its retrieval score
``r_mean``, reported as mean ± std over several evaluation models. To put such a
score on a readable scale we also evaluate *random* coresets along a ladder of
sizes N (for instance 100, 200, 500, ..., 30000 pairs). The worth-N of a set is
the number of random real pairs that reaches the same ``r_mean``, read off the
ladder by linear interpolation of ``log N`` against ``r_mean``.

The ladder is a mapping ``N -> summary`` where a summary is a dict holding at
least ``"mean"`` and ``"std"`` (e.g. the ``"r_mean"`` entry of
:func:`evaluation.metrics.summarize_runs`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

#: Size of the figure written by :func:`plot_worth`, in inches, and its resolution.
#: The PNG is therefore ``FIGSIZE[0] * DPI`` by ``FIGSIZE[1] * DPI`` pixels.
FIGSIZE = (7.0, 4.5)
DPI = 100

#: Significant figures kept by :func:`format_worth`.
SIGNIFICANT_FIGURES = 3

BELOW = "below"
ABOVE = "above"


@dataclass(frozen=True)
class WorthN:
    """The worth-N of one score, with its uncertainty range.

    Attributes:
        n: the point estimate (number of random real pairs), or ``None`` when the
            score lies outside the ladder.
        bound: ``None`` when ``n`` is known; ``"below"`` when the score is under
            the smallest ladder mean (worth fewer than ``n_min`` pairs);
            ``"above"`` when it is over the largest one (worth more than ``n_max``).
        low: worth-N of ``mean - sigma``, or ``None`` when that score is outside
            the ladder (then ``low_bound`` says on which side).
        high: worth-N of ``mean + sigma``, or ``None`` (then ``high_bound`` says why).
        low_bound: ``"below"`` / ``"above"`` / ``None`` for ``low``, as ``bound`` for ``n``.
        high_bound: the same for ``high``.
        n_min: the smallest size of the ladder.
        n_max: the largest size of the ladder.
    """

    n: float | None
    bound: str | None
    low: float | None
    high: float | None
    low_bound: str | None
    high_bound: str | None
    n_min: int
    n_max: int

    def as_dict(self) -> dict[str, Any]:
        """The fields as plain JSON types, plus ``"text"``, the :func:`format_worth` string."""
        return {
            "n": None if self.n is None else float(self.n),
            "bound": self.bound,
            "low": None if self.low is None else float(self.low),
            "high": None if self.high is None else float(self.high),
            "low_bound": self.low_bound,
            "high_bound": self.high_bound,
            "n_min": int(self.n_min),
            "n_max": int(self.n_max),
            "text": format_worth(self),
        }


# --------------------------------------------------------------------------- #
# The ladder curve
# --------------------------------------------------------------------------- #
def _ladder_size(key: Any) -> int:
    """A ladder key as a positive integer size; strings such as ``"100"`` (JSON keys) are accepted."""
    try:
        if isinstance(key, str):
            size = int(key.strip())
        else:
            value = float(key)
            if not value.is_integer():
                raise ValueError
            size = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"ladder sizes must be whole numbers of pairs, got {key!r}") from None
    if size < 1:
        raise ValueError(f"ladder sizes must be at least 1 pair, got {key!r}")
    return size


def _finite(value: Any, what: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"{what} must be finite, got {value!r}")
    return number


def _parse_ladder(ladder: Mapping[Any, Mapping[str, Any]]) -> tuple[list[int], list[float], list[float]]:
    """Validate a ladder and return its sizes (ascending), means and stds in that order."""
    if not isinstance(ladder, Mapping):
        raise ValueError(f"the ladder must be a mapping N -> {{'mean', 'std'}}, got {type(ladder).__name__}")
    if len(ladder) < 2:
        raise ValueError(f"the ladder needs at least 2 sizes to interpolate, got {len(ladder)}")
    rows: dict[int, tuple[float, float]] = {}
    for key, summary in ladder.items():
        size = _ladder_size(key)
        if size in rows:
            raise ValueError(f"ladder size {size} is given twice")
        if not isinstance(summary, Mapping) or "mean" not in summary or "std" not in summary:
            raise ValueError(f"ladder entry N={size} must be a dict with keys 'mean' and 'std', got {summary!r}")
        mean = _finite(summary["mean"], f"ladder mean at N={size}")
        std = _finite(summary["std"], f"ladder std at N={size}")
        if std < 0:
            raise ValueError(f"ladder std at N={size} must be >= 0, got {std}")
        rows[size] = (mean, std)
    sizes = sorted(rows)
    return sizes, [rows[n][0] for n in sizes], [rows[n][1] for n in sizes]


def _running_max(values: list[float]) -> list[float]:
    out, best = [], -math.inf
    for value in values:
        best = max(best, value)
        out.append(best)
    return out


def _invert(log_sizes: list[float], means: list[float], target: float) -> tuple[float | None, str | None]:
    """Smallest N at which the monotone curve ``means`` (over ``log_sizes``) reaches ``target``.

    Returns ``(N, None)`` inside the ladder, ``(None, "below")`` / ``(None, "above")`` outside.
    """
    if target < means[0]:
        return None, BELOW
    if target > means[-1]:
        return None, ABOVE
    # First ladder point whose (monotone) mean reaches the target. Taking the first one
    # is what resolves flat stretches (equal consecutive means) to their left end.
    j = next(i for i, m in enumerate(means) if m >= target)
    if j == 0 or means[j] == target:
        return math.exp(log_sizes[j]), None
    # Here means[j - 1] < target < means[j], so the segment has a positive slope.
    t = (target - means[j - 1]) / (means[j] - means[j - 1])
    return math.exp(log_sizes[j - 1] + t * (log_sizes[j] - log_sizes[j - 1])), None


def _interp_std(log_sizes: list[float], stds: list[float], log_n: float) -> float:
    """The ladder std, linearly interpolated in log N (clamped to the end points)."""
    if log_n <= log_sizes[0]:
        return stds[0]
    if log_n >= log_sizes[-1]:
        return stds[-1]
    j = next(i for i, x in enumerate(log_sizes) if x >= log_n)
    t = (log_n - log_sizes[j - 1]) / (log_sizes[j] - log_sizes[j - 1])
    return stds[j - 1] + t * (stds[j] - stds[j - 1])


def worth_n(ladder: dict[int, dict], mean: float, std: float = 0.0) -> WorthN:
    """Worth-N of a score ``mean ± std`` against a ladder of random coresets.

    The curve: ladder sizes are sorted ascending and their means replaced by a
    running maximum, so that the curve never goes down. A noisy ladder can dip
    (say random-500 scoring a little under random-200); without the running
    maximum a score inside the dip would be reached at several sizes, i.e. have
    several worths. On the monotone curve every reachable score has a single
    answer: the smallest N at which the curve reaches it. Between two consecutive
    ladder points ``log N`` is linear in ``r_mean``, so the point estimate is the
    exponential of the interpolated ``log N``. Where consecutive monotone means
    are equal (a flat stretch), the left (smaller) size is taken.

    Scores under the first ladder mean give a lower-side bound (``bound="below"``:
    worth fewer than ``n_min`` pairs); scores over the last give an upper-side
    bound (``bound="above"``: worth more than ``n_max``). In both cases ``n`` is ``None``.

    The uncertainty combines the score's own spread and the ladder's:
    ``sigma = sqrt(std**2 + s_ladder**2)`` where ``s_ladder`` is the (raw, not
    monotone) ladder std, linearly interpolated in ``log N`` at the point
    estimate, or taken at the nearer end of the ladder for an out-of-range score.
    ``low`` and ``high`` are the worths of ``mean - sigma`` and ``mean + sigma``,
    each possibly a bound (``low_bound`` / ``high_bound``).

    Args:
        ladder: ``N -> {"mean": ..., "std": ..., ...}`` for at least 2 sizes, all N >= 1.
            Keys may also be numeric strings such as ``"100"`` (as read back from JSON).
        mean: the score (``r_mean``) of the set to judge.
        std: its standard deviation over evaluation models (>= 0).

    Raises:
        ValueError: on a ladder with fewer than 2 sizes, a size below 1 or not a
            whole number, a size given twice, an entry without ``"mean"``/``"std"``,
            a non-finite or negative value, or a non-finite ``mean``/``std``.
    """
    sizes, means, stds = _parse_ladder(ladder)
    mean = _finite(mean, "mean")
    std = _finite(std, "std")
    if std < 0:
        raise ValueError(f"std must be >= 0, got {std}")
    log_sizes = [math.log(n) for n in sizes]
    curve = _running_max(means)

    n, bound = _invert(log_sizes, curve, mean)
    if bound == BELOW:
        s_ladder = stds[0]
    elif bound == ABOVE:
        s_ladder = stds[-1]
    else:
        s_ladder = _interp_std(log_sizes, stds, math.log(n))
    sigma = math.sqrt(std ** 2 + s_ladder ** 2)
    low, low_bound = _invert(log_sizes, curve, mean - sigma)
    high, high_bound = _invert(log_sizes, curve, mean + sigma)
    return WorthN(n=n, bound=bound, low=low, high=high, low_bound=low_bound, high_bound=high_bound,
                  n_min=sizes[0], n_max=sizes[-1])


# --------------------------------------------------------------------------- #
# Text
# --------------------------------------------------------------------------- #
def _round_count(value: float) -> int:
    """``value`` rounded half-up to 3 significant figures, but never finer than a whole pair."""
    if value < 1:
        return max(0, int(math.floor(value + 0.5)))
    magnitude = int(math.floor(math.log10(value)))
    quantum = 10 ** max(0, magnitude - (SIGNIFICANT_FIGURES - 1))
    return int(math.floor(value / quantum + 0.5)) * quantum


def _side_text(value: float | None, bound: str | None, n_min: int, n_max: int) -> str:
    if bound == BELOW:
        return f"< {n_min:,}"
    if bound == ABOVE:
        return f"> {n_max:,}"
    return f"{_round_count(value):,}"


def format_worth(w: WorthN) -> str:
    """A short readable form of a :class:`WorthN`.

    Counts are rounded to 3 significant figures (and to whole pairs) with thousands
    separators; the ladder ends of a bound are printed exactly. Examples::

        "1,240 (820–1,900)"    point estimate (low–high)
        "640 (< 100–1,100)"    the low side falls under the ladder
        "< 100"                the score itself is under the ladder
        "> 30,000"             the score itself is over the ladder
        "316"                  low, high and the estimate round to the same count
    """
    if w.bound is not None:
        return _side_text(None, w.bound, w.n_min, w.n_max)
    centre = _side_text(w.n, None, w.n_min, w.n_max)
    low = _side_text(w.low, w.low_bound, w.n_min, w.n_max)
    high = _side_text(w.high, w.high_bound, w.n_min, w.n_max)
    if low == centre == high:
        return centre
    return f"{centre} ({low}–{high})"


# --------------------------------------------------------------------------- #
# Figure
# --------------------------------------------------------------------------- #
def plot_worth(ladder: dict[int, dict], points: dict[str, dict], path, title: str = "",
               full: dict | None = None) -> Path:
    """Draw the random ladder with the scores of some sets and save it as a PNG.

    The random ladder is a line with error bars (its std) against N on a log
    axis; where the running maximum used by :func:`worth_n` differs from the raw
    means it is drawn too, as a thin grey line. Each entry of
    ``points`` (``label -> {"mean", "std"}``) is a horizontal dashed line at its
    mean inside a shaded band of ± its std, with a marker at (worth-N, mean) when
    that worth lies on the ladder; its legend entry reads
    ``"label: worth-N ≈ …"`` (``"label: worth-N < 100"`` for a bound). ``full``,
    a summary of training on the full data, is drawn as a horizontal dotted line.

    The figure is ``FIGSIZE`` inches at ``DPI`` dots per inch; the parent folder
    of ``path`` is created if needed. Returns ``path`` as a :class:`~pathlib.Path`.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes, means, stds = _parse_ladder(ladder)
    curve = _running_max(means)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI)
    try:
        ax.errorbar(sizes, means, yerr=stds, color="black", marker="o", markersize=4, capsize=3,
                    linewidth=1.5, label="random real pairs", zorder=3)
        if curve != means:
            ax.plot(sizes, curve, color="grey", linewidth=1, linestyle="-", alpha=0.7,
                    label="running max (used for worth-N)", zorder=2)
        colours = plt.rcParams["axes.prop_cycle"].by_key().get("color", ["C0"])
        for k, (label, summary) in enumerate(points.items()):
            colour = colours[k % len(colours)]
            mean = float(summary["mean"])
            std = float(summary.get("std", 0.0))
            w = worth_n(ladder, mean, std)
            text = format_worth(w)
            legend = f"{label}: worth-N ≈ {text}" if w.bound is None else f"{label}: worth-N {text}"
            ax.axhline(mean, color=colour, linestyle="--", linewidth=1.2, label=legend, zorder=1)
            if std > 0:
                ax.axhspan(mean - std, mean + std, color=colour, alpha=0.15, linewidth=0, zorder=0)
            if w.n is not None:
                ax.plot([w.n], [mean], marker="D", markersize=7, color=colour, markeredgecolor="black",
                        linestyle="none", zorder=4)
        finish_r_mean_plot(fig, ax, path, "random real pairs N", title, full)
    finally:
        plt.close(fig)
    return path


def finish_r_mean_plot(fig, ax, path: Path, xlabel: str, title: str = "", full: dict | None = None) -> None:
    """The common end of an r_mean plot against a number of pairs: full-data training (an r_mean summary) as a
    dotted horizontal line, a log x axis, labels, grid, legend; saved as a PNG at DPI."""
    if full is not None:
        full_mean = float(full["mean"])
        full_std = full.get("std")
        label = "full data" + (f": {full_mean:.2f} ± {float(full_std):.2f}" if full_std is not None
                               else f": {full_mean:.2f}")
        ax.axhline(full_mean, color="dimgrey", linestyle=":", linewidth=1.5, label=label, zorder=1)
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("r_mean")
    if title:
        ax.set_title(title)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize="small", loc="best")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=DPI)
