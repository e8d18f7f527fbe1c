"""The rows of the pipeline's table, each with the kind of set it judges (comparison/stages.py builds them,
comparison/report.py and comparison/ladder_rule.py read them).

A row's kind decides how the report reads it: the random real coresets of [compare] `ladder` and the full-data row
are the curve that worth-N is read against; every other set gets a worth-N on it, except a random coreset listed
among `coreset_methods` (its worth in random real pairs is its own size by construction); the base method's
distilled rows are the ones the summary compares with all the others; a distilled row of one seed is in the table
but neither marked on the worth-N plot nor listed in the summary's worth lines.

results.json records each row's kind under "kinds" (`Row.record`). A results.json written before rows had kinds
has none: readers then take a row's kind from its label (`row_from_label`). The labels tell every kind apart but
one: a random coreset among `coreset_methods` is random-<N> as a rung of the ladder is, and is read as a rung.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

from comparison.config import BASE, BASE_ROWS
from settings.choices import CENTROIDS, RANDOM


class Kind(str, Enum):
    LADDER = "ladder"        # a random real coreset of [compare] ladder: a rung of the worth-N curve
    CORESET = "coreset"      # real pairs chosen by a coreset method of [compare] coreset_methods
    CENTROIDS = "centroids"  # the k-means feature centroids (frozen trunk only)
    DISTILLED = "distilled"  # a distilled set of any method: one seed's, or pooled over the seeds
    FULL = "full"            # training on every pair (or the experts' last epoch): the curve's top rung
    REDUCED = "reduced"      # the real pairs reduce.py kept of the training split ([reduce], comparison/reduced.py)


FULL_LABEL = "full data"  # the full-data row's label; with full = "experts" it says how many experts and epochs
FULL_REPORT = "full"      # its evaluate.py report: results/full.json


@dataclass
class Row:
    """One row of the table: its label, its kind, and the evaluate.py report (or the pooled summary) behind it."""

    label: str
    kind: Kind
    report: dict
    method: str | None = None  # the distillation method (base, lors, ...) or the coreset method (random, kmeans, ...)
    size: int | None = None    # pairs in the set; None for full data
    seed: int | None = None    # a distilled row of one seed: that seed
    seeds: int = 1             # how many distillation seeds the row's numbers pool
    file: str | None = None    # the name of its evaluate.py report under results/ (none for a pooled row)

    @property
    def on_ladder(self) -> bool:
        """A rung of the curve that worth-N is read against."""
        return self.kind in (Kind.LADDER, Kind.FULL)

    @property
    def random_coreset(self) -> bool:
        """Real pairs drawn at random, on the ladder or among the coreset methods."""
        return self.kind in (Kind.LADDER, Kind.CORESET) and self.method == RANDOM

    @property
    def gets_worth(self) -> bool:
        """Whether the row is read against the ladder: any set but the rungs and random real coresets."""
        return not (self.on_ladder or self.random_coreset)

    @property
    def base_distilled(self) -> bool:
        """A distilled set of the paper's method: what the printed summary compares with every other row."""
        return self.kind is Kind.DISTILLED and self.method == BASE

    @property
    def single_seed(self) -> bool:
        return self.seed is not None

    def record(self) -> dict:
        """What results.json keeps of the row besides its numbers."""
        return {"kind": self.kind.value, "method": self.method, "size": self.size, "seed": self.seed,
                "seeds": self.seeds, "file": self.file}

    @classmethod
    def from_record(cls, label: str, record: dict, report: dict) -> Row:
        return cls(label, Kind(record["kind"]), report, record.get("method"), record.get("size"), record.get("seed"),
                   record.get("seeds", 1), record.get("file"))


# The labels the pipeline gives: <name>-<size> (config.row_name for a distilled set), then for a distilled set
# " (seed <s>)" or " (<n> seeds)".
LABEL = re.compile(r"(?P<name>.+)-(?P<size>\d+)(?: \((?:seed (?P<seed>\d+)|(?P<seeds>\d+) seeds)\))?")


def row_from_label(label: str, report: dict) -> Row | None:
    """A row of an output folder written before rows had kinds, read off its label (or its report's file name);
    None for a label the pipeline does not give."""
    if label == FULL_REPORT or label.partition(" (")[0] == FULL_LABEL:  # "full data (3 experts, 10 ep)": no report
        return Row(label, Kind.FULL, report, file=FULL_REPORT if label in (FULL_REPORT, FULL_LABEL) else None)
    found = LABEL.fullmatch(label)
    if found is None:
        return None
    name, size = found["name"], int(found["size"])
    if found["seed"] is not None or found["seeds"] is not None:  # only distilled rows name their seeds
        seed = None if found["seed"] is None else int(found["seed"])
        return Row(label, Kind.DISTILLED, report, BASE if name == BASE_ROWS else name, size, seed,
                   int(found["seeds"] or 1), label if seed is not None else None)
    kind = {RANDOM: Kind.LADDER, CENTROIDS: Kind.CENTROIDS}.get(name, Kind.CORESET)
    return Row(label, kind, report, name, size, file=label)
