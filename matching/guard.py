"""Keeping long distillation runs stable: which meta-gradient steps are applied and which are skipped.

A single bad iteration can ruin a synthetic set that took hours: a meta-gradient that is not finite,
or one that spikes far above its recent size (a near-singular student step, BatchNorm on a tiny
batch), moves the pixels, texts and step sizes so far that the run never recovers. `StepGuard`
skips such a step instead of applying it:

- a gradient with a NaN or infinite entry;
- a spike: the norm of one learned group (pixels, texts, step sizes, similarity) above `factor` times
  the median of that group's last `window` applied norms (once `warmup` steps were applied);
- a step after which a learned step size is no longer positive, or a learned tensor not finite (the
  caller restores the state before the step).

Skipped steps are counted (in total and by reason) and reported; after `max_consecutive` skips in a
row the run stops, keeping the last good state. The guard's history is part of the resume state, so
a resumed run makes the same decisions as an uninterrupted one; the state saved by a stopped run has
no skips in a row behind it (`after_divergence`).
"""
from __future__ import annotations

import math
import statistics


class StepGuard:
    def __init__(self, factor: float = 10.0, window: int = 20, warmup: int = 5, max_consecutive: int = 20):
        self.factor, self.window, self.warmup, self.max_consecutive = factor, window, warmup, max_consecutive
        self.history: dict[str, list[float]] = {}
        self.skipped: dict[str, int] = {}
        self.consecutive = 0

    def gradient_problem(self, norms: dict[str, float]) -> str | None:
        """Why a meta-gradient with these group norms must not be applied (None: it may be)."""
        bad = [name for name, value in norms.items() if not math.isfinite(value)]
        if bad:
            return f"non-finite gradient ({', '.join(bad)})"
        if self.factor <= 0:
            return None
        for name, value in norms.items():
            recent = self.history.get(name, [])
            if len(recent) >= self.warmup:
                median = statistics.median(recent)
                if median > 0 and value > self.factor * median:
                    return f"gradient spike ({name} norm {value:.3g} > {self.factor:g} x recent median {median:.3g})"
        return None

    def applied(self, norms: dict[str, float]) -> None:
        for name, value in norms.items():
            self.history[name] = (self.history.get(name, []) + [value])[-self.window:]
        self.consecutive = 0

    def skip(self, reason: str) -> None:
        kind = reason.split(" (")[0]
        self.skipped[kind] = self.skipped.get(kind, 0) + 1
        self.consecutive += 1

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    @property
    def exhausted(self) -> bool:
        return self.consecutive >= self.max_consecutive

    def state(self) -> dict:
        return {"history": {k: list(v) for k, v in self.history.items()}, "skipped": dict(self.skipped),
                "consecutive": self.consecutive}

    def restore(self, state: dict) -> None:
        """Take back a `state()`; ValueError naming the part that is not what `state()` writes."""
        history, skipped, consecutive = state.get("history"), state.get("skipped"), state.get("consecutive")
        if not (isinstance(history, dict) and all(isinstance(v, list) and all(_finite(x) for x in v)
                                                  for v in history.values())):
            raise ValueError(f"the step guard's history {history!r} is not lists of finite gradient norms")
        if not (isinstance(skipped, dict) and all(_count(n) for n in skipped.values())):
            raise ValueError(f"the step guard's skip counts {skipped!r} are not whole numbers >= 0")
        if not _count(consecutive):
            raise ValueError(f"the step guard's run of skips {consecutive!r} is not a whole number >= 0")
        self.history = {k: list(v) for k, v in history.items()}
        self.skipped = dict(skipped)
        self.consecutive = consecutive


def after_divergence(state: dict) -> dict:
    """The guard `state` to save with the set a diverged run keeps. A refused step never moves the set, so that
    set is the one from before the first refused step, with no skip behind it: the run of skips starts at 0
    (a resume with lower learning rates gets the whole --max_skips), the counts by reason and the history stay."""
    return {**state, "consecutive": 0}


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
