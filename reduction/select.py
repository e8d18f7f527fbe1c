"""Which image-text pairs to keep: the selection methods of data reduction and their combinations.

Every method sees the same `PairFeatures` (one embedding row per pair, optionally an image-text alignment
score, which image each pair shows and the features to cluster on) and keeps a share `keep` of the N pairs:

- ``random``: a uniform random subset.
- ``alignment``: the best-aligned pairs ("CLIP score" filtering); ties go to the lower index.
- ``prototype_hard`` / ``prototype_easy`` (Sorscher et al. 2022): k-means on the embedding; a pair's score is
  its cosine distance to its centroid; hard keeps the farthest pairs, easy the closest (ties: lower index).
- ``semdedup`` (Abbas et al. 2023): k-means on the embedding; inside each cluster the pairs are visited by
  decreasing distance to the centroid (ties: lower index first), and a pair is dropped when its cosine with a
  pair already kept in the same cluster is above 1 - epsilon. Of a group of near-duplicates the least
  prototypical member (farthest from the centroid) is thus kept, and of exact duplicates the lowest index.
  It is a filter: it keeps everything that is not a near-duplicate. As the last method it draws the target
  count uniformly at random (seeded) from the survivors.
- ``balanced`` (TL;DR, Wang et al. 2023): keep the better-aligned `filter_fraction` of the pairs (raised to
  the target count when that is more), cluster the survivors' `cluster_features` after PCA whitening, and
  take the same share of every cluster, at random inside a cluster (quotas: see `quotas`).
- ``density`` (Abbas et al. 2024, density-based pruning): k-means on the embedding; a cluster's complexity is
  the mean distance of its pairs to the centroid times the mean distance of its centroid to its nearest
  `density_neighbours` centroids; quotas are proportional to softmax(complexity / temperature), capped by
  the cluster sizes; random inside a cluster.

``prototype_*``, ``semdedup`` and ``density`` cluster the L2-normalised embedding as it is, because their
scores are cosines in that space; ``balanced`` clusters `cluster_features` (default the embedding) with
`pca_dim` / `whiten`.

Combinations (``"semdedup+balanced"`` or a list): every method but the last is a filter applied in order,
and only ``semdedup`` (drops near-duplicates) and ``alignment`` (keeps the better-aligned `filter_fraction`,
raised to the target count) can filter; the last method selects the target count from what is left.
"""
from __future__ import annotations

import difflib
import math
import numbers
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np

from reduction.cluster import DEFAULT_CHUNK, Clustering, cluster, take_rows
from settings.choices import REDUCE_METHODS, check_registry
from utils.errors import UserError

METHODS = ("random", "alignment", "prototype_hard", "prototype_easy", "semdedup", "balanced", "density")
check_registry("reduction methods", REDUCE_METHODS, METHODS)
FILTERS = ("semdedup", "alignment")
NEEDS_ALIGNMENT = ("alignment", "balanced")
CLUSTERED = ("prototype_hard", "prototype_easy", "semdedup", "balanced", "density")


@dataclass
class PairFeatures:
    """What the methods see about N pairs: `embedding` [N, d] (may be a memmap; rows are L2-normalised as they
    are read), `alignment` [N] (image-text cosine in an aligned space, higher = better matched) or None,
    `image_of_pair` [N] int64 or None, `cluster_features` [N, d2] or None (None: cluster on the embedding)."""
    embedding: np.ndarray
    alignment: np.ndarray | None = None
    image_of_pair: np.ndarray | None = None
    cluster_features: np.ndarray | None = None

    @property
    def n(self) -> int:
        return len(self.embedding)

    def subset(self, rows: np.ndarray) -> PairFeatures:
        """The features of the pairs at `rows` only (read into memory), in that order."""
        take = lambda values: None if values is None else np.asarray(values[rows])  # noqa: E731
        return PairFeatures(take(self.embedding), take(self.alignment), take(self.image_of_pair),
                            take(self.cluster_features))


@dataclass
class SelectOptions:
    """Knobs of the methods. `clusters` is the k of k-means: more than N pairs is an error; a stage that sees
    fewer pairs than `clusters` (after a filter) uses as many clusters as it has pairs, and `Selection.options`
    records the number each stage used."""
    seed: int = 0
    clusters: int = 1000
    epsilon: float = 0.05
    filter_fraction: float = 0.5
    pca_dim: int | None = None
    whiten: bool = True
    density_temperature: float = 0.1
    density_neighbours: int = 5
    block: int = 4096  # semdedup compares this many pairs at a time with the kept ones
    chunk: int = DEFAULT_CHUNK
    sample: int | None = None  # rows k-means trains on (None: max(256 k, 100,000))
    niter: int = 20
    progress: bool = False


@dataclass
class Selection:
    """The outcome: `kept` (sorted int64 indices into the N pairs), `stages` (one dict per method: method,
    pairs_in, pairs_out, seconds; when it clustered also clusters, cluster_seconds (k-means and assignment)
    and train_seconds (k-means training alone)), `scores` ([N] float32 score the last method ranked by, NaN
    for pairs a filter removed before it; None for random), `clusters` ([N] int64 assignment of the last stage
    that clustered, -1 for pairs it did not see; None when none clustered) and `options` (JSON-able record of
    what was used)."""
    kept: np.ndarray
    stages: list[dict]
    scores: np.ndarray | None
    clusters: np.ndarray | None
    options: dict = field(default_factory=dict)

    def mapped(self, rows: np.ndarray, total: int) -> Selection:
        """This selection made among the pairs at `rows` of `total` (`PairFeatures.subset`), as indices into all
        `total` pairs; the pairs outside `rows` get no score (NaN) and no cluster (-1)."""
        rows = np.asarray(rows, dtype=np.int64)
        scores = clusters = None
        if self.scores is not None:
            scores = np.full(total, np.nan, dtype=np.float32)
            scores[rows] = self.scores
        if self.clusters is not None:
            clusters = np.full(total, -1, dtype=np.int64)
            clusters[rows] = self.clusters
        return Selection(np.sort(rows[self.kept]), self.stages, scores, clusters, dict(self.options))


@dataclass
class _Outcome:
    """What one method did to its pool (the indices into N it was given): `kept` positions into the pool,
    and per-pool-position `scores` / `assignment` (-1: not clustered) when it has them."""
    kept: np.ndarray
    scores: np.ndarray | None = None
    assignment: np.ndarray | None = None
    clusters: int | None = None
    cluster_seconds: float | None = None
    train_seconds: float | None = None


def round_count(fraction: float, n: int) -> int:
    """round(fraction * n), halves up, at least 1."""
    return max(1, int(math.floor(fraction * n + 0.5)))


def _real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def parse_methods(methods: list[str] | tuple[str, ...] | str) -> list[str]:
    """The method names of a combination given as a list or as one string joined by '+'; validates them."""
    parts = [methods] if isinstance(methods, str) else list(methods)
    names = [name.strip() for part in parts for name in str(part).split("+")]
    if not names or any(not name for name in names):
        raise UserError(f"no selection method in {methods!r}; choose from {', '.join(METHODS)}")
    for name in names:
        if name not in METHODS:
            close = difflib.get_close_matches(name, METHODS, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise UserError(f"unknown selection method {name!r}{hint}; choose from {', '.join(METHODS)}")
    if len(set(names)) != len(names):
        raise UserError(f"a method appears twice in {'+'.join(names)}")
    for name in names[:-1]:
        if name not in FILTERS:
            raise UserError(f"{name} can only be the last method of a combination; the filters before it can be "
                            f"{' and '.join(FILTERS)}")
    return names


def _check(names: list[str], keep: float, features: PairFeatures, options: SelectOptions) -> None:
    if not _real(keep) or not math.isfinite(keep) or not 0 < keep <= 1:
        raise UserError(f"keep must be a fraction of the pairs in (0, 1], got {keep!r}")
    embedding = features.embedding
    if getattr(embedding, "ndim", 0) != 2 or len(embedding) < 1:
        raise UserError(f"the embedding must be a 2-D array [pairs, dimensions] with at least one pair, got "
                        f"shape {getattr(embedding, 'shape', None)}")
    n = features.n
    for name in ("alignment", "image_of_pair"):
        value = getattr(features, name)
        if value is not None and np.shape(value) != (n,):
            raise UserError(f"{name} must hold one value per pair ({n}), got shape {np.shape(value)}")
    if features.cluster_features is not None and (features.cluster_features.ndim != 2
                                                  or len(features.cluster_features) != n):
        raise UserError(f"cluster_features must have one row per pair ({n}), got shape "
                        f"{features.cluster_features.shape}")
    needing = [name for name in names if name in NEEDS_ALIGNMENT]
    if needing and features.alignment is None:
        raise UserError(f"{needing[0]} ranks pairs by their image-text alignment, which was not given: an aligned "
                        "space is needed (the caller supplies it from a trained expert's image and text heads)")
    if needing and not np.isfinite(features.alignment).all():
        bad = int((~np.isfinite(features.alignment)).sum())
        raise UserError(f"the alignment scores hold {bad} values that are not finite numbers")
    if not _real(options.seed) or int(options.seed) != options.seed or options.seed < 0:
        raise UserError(f"seed must be a non-negative integer, got {options.seed!r}")
    if any(name in CLUSTERED for name in names):
        if not _real(options.clusters) or int(options.clusters) != options.clusters or options.clusters < 1:
            raise UserError(f"clusters must be a positive integer, got {options.clusters!r}")
        if options.clusters > n:
            raise UserError(f"clusters ({options.clusters}) is more than the {n} pairs to select from")
    if "semdedup" in names and (not _real(options.epsilon) or not 0 <= options.epsilon <= 1):
        raise UserError(f"epsilon must be in [0, 1] (pairs with cosine above 1 - epsilon are duplicates), "
                        f"got {options.epsilon!r}")
    if (("balanced" in names or "alignment" in names[:-1])
            and (not _real(options.filter_fraction) or not 0 < options.filter_fraction <= 1)):
        raise UserError(f"filter_fraction must be in (0, 1], got {options.filter_fraction!r}")
    if "density" in names:
        if not _real(options.density_temperature) or not options.density_temperature > 0:
            raise UserError(f"density_temperature must be positive, got {options.density_temperature!r}")
        if not isinstance(options.density_neighbours, int) or options.density_neighbours < 1:
            raise UserError(f"density_neighbours must be a positive integer, got {options.density_neighbours!r}")
    if options.block < 1:
        raise UserError(f"block must be positive, got {options.block!r}")


def select(methods: list[str] | str, keep: float, features: PairFeatures,
           options: SelectOptions | None = None) -> Selection:
    """Keep round(keep * N) pairs (at least 1) by `methods`: the filters in order, then the last method."""
    options = options or SelectOptions()
    names = parse_methods(methods)
    _check(names, keep, features, options)
    n = features.n
    target = round_count(keep, n)
    pool = np.arange(n, dtype=np.int64)
    stages: list[dict] = []
    scores = clusters = None
    effective: dict[str, int] = {}
    for position, name in enumerate(names):
        last = position == len(names) - 1
        if len(pool) < target:
            raise UserError(f"{len(pool)} pairs are left for {name}, fewer than the {target} asked for; keep less")
        started = time.perf_counter()
        outcome = _METHOD_FUNCTIONS[name](pool, target, last, features, options)
        stage = {"method": name, "pairs_in": int(len(pool)), "pairs_out": int(len(outcome.kept)),
                 "seconds": round(time.perf_counter() - started, 3)}
        if outcome.clusters is not None:
            stage["clusters"] = effective[name] = outcome.clusters
            stage["cluster_seconds"] = round(outcome.cluster_seconds, 3)
            stage["train_seconds"] = round(outcome.train_seconds, 3)
        if outcome.assignment is not None:
            clusters = np.full(n, -1, dtype=np.int64)
            clusters[pool] = outcome.assignment
        if last and outcome.scores is not None:
            scores = np.full(n, np.nan, dtype=np.float32)
            scores[pool] = outcome.scores
        stages.append(stage)
        pool = pool[np.sort(outcome.kept)]
    record = {key: value for key, value in asdict(options).items() if key != "progress"}
    record.update(methods="+".join(names), keep=float(keep), pairs=n, target=target, effective_clusters=effective)
    return Selection(kept=pool, stages=stages, scores=scores, clusters=clusters, options=record)


# ---------------------------------------------------------------------------------------------------------------
# the methods: each takes the pool (sorted indices into N), the target count and whether it is the last method,
# and returns an _Outcome whose `kept` are positions into the pool.

def _top(values: np.ndarray, count: int, largest: bool = True) -> np.ndarray:
    """Positions of the `count` largest (or smallest) values; equal values go to the lower position first."""
    order = np.argsort(-values if largest else values, kind="stable")
    return order[:count]


def _k(pool_size: int, options: SelectOptions) -> int:
    return int(min(options.clusters, pool_size))


def _timed_cluster(space: np.ndarray, rows: np.ndarray, n: int, options: SelectOptions,
                   **transform) -> tuple[Clustering, float]:
    """cluster() of space[rows] (rows: sorted indices into the n pairs) with the options' k, seed and sizes,
    and the seconds it took."""
    started = time.perf_counter()
    clustering = cluster(space, _k(len(rows), options), options.seed, sample=options.sample, chunk=options.chunk,
                         niter=options.niter, progress=options.progress, rows=None if len(rows) == n else rows,
                         **transform)
    return clustering, time.perf_counter() - started


def _cluster_embedding(pool: np.ndarray, features: PairFeatures, options: SelectOptions) -> tuple[Clustering, float]:
    return _timed_cluster(features.embedding, pool, features.n, options, whiten=False)


def _random(pool, target, last, features, options) -> _Outcome:
    if not last:
        raise UserError("random can only be the last method")
    rng = np.random.default_rng(options.seed)
    return _Outcome(kept=np.sort(rng.choice(len(pool), size=target, replace=False)))


def _alignment_filter_count(pool_size: int, target: int, options: SelectOptions) -> int:
    return min(pool_size, max(round_count(options.filter_fraction, pool_size), target))


def _alignment(pool, target, last, features, options) -> _Outcome:
    align = np.asarray(features.alignment[pool], dtype=np.float32)
    count = target if last else _alignment_filter_count(len(pool), target, options)
    return _Outcome(kept=_top(align, count), scores=align)


def _prototype(largest: bool) -> Callable[..., _Outcome]:
    def run(pool, target, last, features, options) -> _Outcome:
        clustering, seconds = _cluster_embedding(pool, features, options)
        return _Outcome(kept=_top(clustering.distance, target, largest=largest), scores=clustering.distance,
                        assignment=clustering.assignment, clusters=clustering.k, cluster_seconds=seconds,
                        train_seconds=clustering.train_seconds)
    return run


def dedup_cluster(unit_rows: np.ndarray, threshold: float, block: int = 4096,
                  kept_chunk: int = 8192) -> np.ndarray:
    """Greedy near-duplicate removal among `unit_rows` [m, d] (unit rows, in visiting order): a row is kept
    unless its cosine with an earlier kept row is above `threshold`. Returns the keep mask [m].

    Works block by block: a block is compared with the rows kept so far (in chunks of `kept_chunk`), then the
    greedy rule is resolved inside the block; memory stays O(block * (block + kept_chunk))."""
    m, d = unit_rows.shape
    keep = np.zeros(m, dtype=bool)
    kept_rows = np.empty((m, d), dtype=np.float32)
    n_kept = 0
    for start in range(0, m, block):
        rows = unit_rows[start:start + block]
        alive = np.ones(len(rows), dtype=bool)
        for k0 in range(0, n_kept, kept_chunk):
            similarity = rows @ kept_rows[k0:min(n_kept, k0 + kept_chunk)].T
            alive &= similarity.max(axis=1) <= threshold
        candidates = np.flatnonzero(alive)
        chosen = rows[candidates]
        close = np.triu(chosen @ chosen.T > threshold, k=1)  # close[i, j]: i before j and near-duplicates
        survive = np.ones(len(candidates), dtype=bool)
        for j in np.flatnonzero(close.any(axis=0)):  # ascending: every earlier row is settled before j
            if survive[np.flatnonzero(close[:j, j])].any():
                survive[j] = False
        kept_here = candidates[survive]
        keep[start + kept_here] = True
        kept_rows[n_kept:n_kept + len(kept_here)] = rows[kept_here]
        n_kept += len(kept_here)
    return keep


def _semdedup(pool, target, last, features, options) -> _Outcome:
    clustering, seconds = _cluster_embedding(pool, features, options)
    size = len(pool)
    if options.epsilon == 0:  # a cosine is never above 1: nothing is a duplicate (rounding aside)
        keep = np.ones(size, dtype=bool)
    else:
        keep = np.zeros(size, dtype=bool)
        # by cluster, then decreasing distance to the centroid, then increasing index
        order = np.lexsort((np.arange(size), -clustering.distance, clustering.assignment))
        bounds = np.concatenate([[0], np.cumsum(np.bincount(clustering.assignment, minlength=clustering.k))])
        clusters = range(clustering.k)
        if options.progress:
            from tqdm import tqdm

            clusters = tqdm(clusters, desc="semdedup", unit="cluster")
        for c in clusters:
            members = order[bounds[c]:bounds[c + 1]]
            if len(members) == 0:
                continue
            if len(members) == 1:
                keep[members] = True
                continue
            unit_rows = take_rows(features.embedding, pool[members], 0, len(members))
            keep[members[dedup_cluster(unit_rows, 1.0 - options.epsilon, options.block)]] = True
    survivors = np.flatnonzero(keep)
    if len(survivors) < target:
        raise UserError(f"semdedup with epsilon {options.epsilon} left {len(survivors)} of {size} pairs, fewer than "
                        f"the {target} asked for; lower epsilon or keep less")
    if last and len(survivors) > target:
        rng = np.random.default_rng(options.seed)
        survivors = np.sort(rng.choice(survivors, size=target, replace=False))
    return _Outcome(kept=survivors, scores=clustering.distance, assignment=clustering.assignment,
                    clusters=clustering.k, cluster_seconds=seconds,
                    train_seconds=clustering.train_seconds)


def quotas(target: int, weights: np.ndarray, capacity: np.ndarray) -> np.ndarray:
    """Integers q with sum(q) == target, 0 <= q <= capacity, q as close to proportional to `weights` as fits.

    Spill-over: a cluster whose proportional share is more than its capacity gets its capacity, and what it
    cannot take is shared among the others in proportion to their weights (repeated until every share fits).
    The real shares are then rounded by largest remainder (ties: lower cluster id). Needs sum(capacity) >=
    target."""
    capacity = np.asarray(capacity, dtype=np.int64)
    weights = np.asarray(weights, dtype=np.float64)
    if target > capacity.sum():
        raise UserError(f"cannot take {target} pairs from clusters that hold {int(capacity.sum())}")
    share = np.zeros(len(capacity), dtype=np.float64)
    full = capacity <= 0
    left = float(target)
    while left > 0:
        open_ = ~full
        if not open_.any():
            break
        w = np.where(open_, weights, 0.0)
        if w.sum() <= 0:  # the clusters with room have no weight: share by capacity
            w = np.where(open_, capacity, 0).astype(np.float64)
        proposal = left * w / w.sum()
        over = open_ & (proposal >= capacity)
        if not over.any():
            share += proposal
            break
        share[over] = capacity[over]
        left = target - share.sum()
        full |= over
    base = np.minimum(np.floor(share + 1e-9).astype(np.int64), capacity)
    missing = target - int(base.sum())
    if missing > 0:
        remainder = np.where(base < capacity, share - base, -np.inf)
        order = np.argsort(-remainder, kind="stable")
        base[order[:missing]] += 1
    return base


def random_per_cluster(assignment: np.ndarray, quota: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Positions drawn uniformly at random, quota[c] of them from cluster c (assignment[i] is i's cluster)."""
    order = np.lexsort((rng.random(len(assignment)), assignment))
    sizes = np.bincount(assignment, minlength=len(quota))
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    sorted_clusters = assignment[order]
    rank = np.arange(len(order)) - starts[sorted_clusters]
    return np.sort(order[rank < quota[sorted_clusters]])


def _balanced(pool, target, last, features, options) -> _Outcome:
    align = np.asarray(features.alignment[pool], dtype=np.float32)
    survivors = np.sort(_top(align, _alignment_filter_count(len(pool), target, options)))
    space = features.cluster_features if features.cluster_features is not None else features.embedding
    clustering, seconds = _timed_cluster(space, pool[survivors], features.n, options, pca_dim=options.pca_dim,
                                         whiten=options.whiten)
    sizes = np.bincount(clustering.assignment, minlength=clustering.k)
    picked = random_per_cluster(clustering.assignment, quotas(target, sizes, sizes),
                                np.random.default_rng(options.seed))
    assignment = np.full(len(pool), -1, dtype=np.int64)
    assignment[survivors] = clustering.assignment
    return _Outcome(kept=survivors[picked], scores=align, assignment=assignment, clusters=clustering.k,
                    cluster_seconds=seconds, train_seconds=clustering.train_seconds)


def density_weights(clustering: Clustering, neighbours: int, temperature: float) -> np.ndarray:
    """softmax(complexity / temperature) per cluster, complexity = mean distance of the cluster's pairs to its
    centroid x mean cosine distance of its centroid to its `neighbours` nearest other centroids."""
    k = clustering.k
    sizes = np.bincount(clustering.assignment, minlength=k)
    intra = np.bincount(clustering.assignment, weights=clustering.distance, minlength=k) / np.maximum(sizes, 1)
    if k > 1:
        between = 1.0 - clustering.centroids.astype(np.float64) @ clustering.centroids.T.astype(np.float64)
        np.fill_diagonal(between, np.inf)
        nearest = np.sort(between, axis=1)[:, :min(neighbours, k - 1)]
        inter = nearest.mean(axis=1)
    else:
        inter = np.ones(1)
    logits = intra * inter / temperature
    weights = np.exp(logits - logits.max())
    return np.where(sizes > 0, weights / weights.sum(), 0.0)


def _density(pool, target, last, features, options) -> _Outcome:
    clustering, seconds = _cluster_embedding(pool, features, options)
    sizes = np.bincount(clustering.assignment, minlength=clustering.k)
    weights = density_weights(clustering, options.density_neighbours, options.density_temperature)
    picked = random_per_cluster(clustering.assignment, quotas(target, weights, sizes),
                                np.random.default_rng(options.seed))
    return _Outcome(kept=picked, scores=clustering.distance, assignment=clustering.assignment,
                    clusters=clustering.k, cluster_seconds=seconds,
                    train_seconds=clustering.train_seconds)


_METHOD_FUNCTIONS: dict[str, Callable[..., _Outcome]] = {
    "random": _random, "alignment": _alignment, "prototype_hard": _prototype(True),
    "prototype_easy": _prototype(False), "semdedup": _semdedup, "balanced": _balanced, "density": _density,
}


def best_captions(alignment: np.ndarray, image_of_pair: np.ndarray, per_image: int) -> np.ndarray:
    """Sorted indices of the pairs to keep when each image may keep at most `per_image` captions: the
    best-aligned ones of each image (ties: lower index)."""
    alignment = np.asarray(alignment)
    image_of_pair = np.asarray(image_of_pair)
    if isinstance(per_image, bool) or not isinstance(per_image, (int, np.integer)) or per_image < 1:
        raise UserError(f"captions per image must be a positive integer, got {per_image!r}")
    if alignment.shape != image_of_pair.shape or alignment.ndim != 1:
        raise UserError(f"alignment {alignment.shape} and image_of_pair {image_of_pair.shape} must both be [pairs]")
    if not np.isfinite(alignment).all():
        raise UserError("the alignment scores hold values that are not finite numbers")
    order = np.lexsort((np.arange(len(alignment)), -alignment.astype(np.float64), image_of_pair))
    images = image_of_pair[order]
    first = np.ones(len(order), dtype=bool)
    first[1:] = images[1:] != images[:-1]
    starts = np.maximum.accumulate(np.where(first, np.arange(len(order)), 0))
    rank = np.arange(len(order)) - starts
    return np.sort(order[rank < per_image]).astype(np.int64)
