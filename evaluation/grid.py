"""Choosing an evaluation's learning rate and number of epochs on the selection split: a grid, widened past its edge.

A set judged with a grid of rates × epochs gets one score per cell (models trained and scored on the
selection split). A best cell at the grid's largest or smallest rate, or its largest or smallest number
of epochs, says the grid may have cut off a better choice, and an under-trained baseline flatters whatever
is compared with it. So, up to `widen` times, the search scores one cell more, one step beyond the edge the
best cell sits on (its rate is the largest or smallest scored so far; the same for its epochs), at the best
cell's other coordinate, with the step the grid used there (the ratio of the two outermost values scored).
The learning rate is widened first, then the epochs. The choice is the best cell scored; the first one scored wins a tie. Where a dimension's
best still sits at an edge when the budget is spent, the result says so. A dimension given one value is fixed,
never widened; epochs never go below 1 and rates never above `lr_max`.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class GridChoice:
    lr: float
    epochs: int
    cells: list[dict] = field(default_factory=list)  # every cell scored, in order: {"lr", "epochs", "r_mean"}
    widened: int = 0                                  # cells scored beyond the first grid
    at_edge: list[str] = field(default_factory=list)  # "lr" / "epochs": dimensions whose choice is still at an edge

    def as_dict(self) -> dict:
        return {"lr": self.lr, "epochs": self.epochs, "cells": self.cells, "widened": self.widened,
                "at_edge": self.at_edge}


def scaled_epochs(epochs: int, scales: list[float] | None) -> list[int]:
    """The epochs of a grid given as multiples of a set's number of epochs (rounded half up, at least 1, each
    once, in increasing order); without scales, the number itself."""
    if not scales:
        return [epochs]
    return sorted({max(1, int(scale * epochs + 0.5)) for scale in scales})


def _beyond(line: list[float], best: float, integer: bool, high: float) -> float | None:
    """The next value past the edge of `line` (the sorted values scored in one dimension, two or more) that
    `best` sits on, or None when it is inside or no further value is allowed."""
    if best == line[-1]:
        value = best * best / line[-2]
        value = int(value + 0.5) if integer else float(f"{value:.3g}")
        return value if best < value <= high else None
    if best == line[0]:
        value = best * best / line[1]
        value = max(1, int(value + 0.5)) if integer else float(f"{value:.3g}")
        return value if 0 < value < best else None
    return None


def search(lrs: list[float], epochs: list[int], score: Callable[[float, int], float], widen: int = 0,
           lr_max: float = float("inf")) -> GridChoice:
    """Score every (rate, epochs) cell of the grid with `score`, widen past the edges up to `widen` more cells,
    and return the best (see the module's docstring)."""
    lrs, epochs = sorted(set(lrs)), sorted(set(epochs))
    scores: dict[tuple[float, int], float] = {}
    for e in epochs:
        for lr in lrs:
            scores[(lr, e)] = score(lr, e)
    widened = 0
    while True:
        best_lr, best_e = max(scores, key=scores.get)
        next_lr = _beyond(sorted({lr for lr, _ in scores}), best_lr, False, lr_max) if len(lrs) > 1 else None
        next_e = _beyond(sorted({e for _, e in scores}), best_e, True, float("inf")) if len(epochs) > 1 else None
        if widened >= widen or (next_lr is None and next_e is None):
            break
        step = (next_lr, best_e) if next_lr is not None else (best_lr, int(next_e))
        scores[step] = score(*step)
        widened += 1
    at_edge = [name for name, value in (("lr", next_lr), ("epochs", next_e)) if value is not None]
    cells = [{"lr": lr, "epochs": e, "r_mean": value} for (lr, e), value in scores.items()]
    return GridChoice(best_lr, best_e, cells, widened, at_edge)
