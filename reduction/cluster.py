"""Spherical k-means and nearest-centroid search with faiss, for feature sets too big to hold twice in memory.

The recipe is the one TL;DR (Wang et al., ICCV 2023) uses to spread a selection over the data: L2-normalise
each row (cosine geometry), PCA-whiten (eigenvalues to the power -1/2, so that no few directions dominate
the distances), L2-normalise again, then spherical k-means. k-means is trained on a random sample of rows
(its cost does not grow with the data), and every row is then assigned to its nearest centroid in chunks,
so the full feature matrix (often a numpy.memmap) is never copied whole.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Iterator

import faiss
import numpy as np

from utils.errors import UserError

DEFAULT_CHUNK = 65536
MIN_SAMPLE = 100_000  # rows k-means trains on at least (when there are that many)
POINTS_PER_CENTROID = 256  # rows per centroid k-means trains on by default (faiss's own default cap)
WHITEN_FLOOR = 1e-3  # eigenvalues below this share of the mean eigenvalue are not amplified further


def l2_normalize(rows: np.ndarray) -> np.ndarray:
    """A float32 copy of `rows` with each row scaled to unit length (all-zero rows stay zero)."""
    out = np.array(rows, dtype=np.float32)  # always a copy: the input may be a read-only memmap
    norms = np.sqrt(np.einsum("ij,ij->i", out, out))
    out /= np.maximum(norms, np.float32(1e-12))[:, None]
    return out


def take_rows(features: np.ndarray, index: np.ndarray | None, start: int, stop: int) -> np.ndarray:
    """Rows start:stop of `features` (or of features[index] when an index is given), L2-normalised."""
    if index is None:
        return l2_normalize(features[start:stop])
    return l2_normalize(features[index[start:stop]])


class Pca:
    """A fitted PCA: `apply(rows)` = (rows - mean) @ matrix, [n, d_in] -> [n, d_out] float32 (the matrix's columns
    are the leading eigenvectors, scaled by eigenvalue ** -1/2 when whitening)."""

    def __init__(self, mean: np.ndarray, matrix: np.ndarray):
        self.mean = mean.astype(np.float32)
        self.matrix = np.ascontiguousarray(matrix, dtype=np.float32)
        self.d_out = matrix.shape[1]

    def apply(self, rows: np.ndarray) -> np.ndarray:
        return (rows - self.mean) @ self.matrix


class RowTransform:
    """Maps raw feature rows to the clustering space: L2-normalise, apply the (whitening) PCA if any,
    L2-normalise again. Callable on any [n, d] array; returns float32 [n, d']."""

    def __init__(self, pca: Pca | None, d_in: int):
        self.pca = pca
        self.d_in = d_in
        self.d_out = pca.d_out if pca is not None else d_in

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        return self.apply_normalized(l2_normalize(rows))

    def apply_normalized(self, unit_rows: np.ndarray) -> np.ndarray:
        """The transform of rows that are already L2-normalised float32."""
        if self.pca is None:
            return unit_rows
        return l2_normalize(self.pca.apply(np.ascontiguousarray(unit_rows)))


@dataclass
class Clustering:
    """k-means result: `centroids` [k, d'] (unit rows, in the transformed space), `assignment` [n] int64
    (nearest centroid of each row), `distance` [n] float32 (1 - cosine to that centroid, transformed space),
    `transform` (raw rows -> transformed space), `sample_size` (rows k-means was trained on) and
    `train_seconds` (reading the sample, PCA and k-means: the part whose cost does not grow with n)."""
    centroids: np.ndarray
    assignment: np.ndarray
    distance: np.ndarray
    transform: RowTransform
    sample_size: int
    train_seconds: float = 0.0

    @property
    def k(self) -> int:
        return len(self.centroids)


def _chunks(n: int, chunk: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, chunk):
        yield start, min(n, start + chunk)


def _progress(iterable, total: int, desc: str, progress: bool):
    if not progress:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="chunk")


def _fit_pca(sample: np.ndarray, d_out: int, whiten: bool, chunk: int = 8192) -> Pca:
    """PCA to d_out dimensions trained on unit rows; with whiten, eigenvalues ** -1/2 with a small floor.

    The covariance is summed in float64 chunk by chunk and decomposed by numpy (LAPACK): faiss's PCAMatrix does the
    same sums with OpenMP threads, which on a machine busy with other work can take minutes instead of seconds."""
    n, d = sample.shape
    mean = sample.mean(axis=0, dtype=np.float64)
    covariance = np.zeros((d, d), dtype=np.float64)
    for start in range(0, n, chunk):
        centred = sample[start:start + chunk].astype(np.float64) - mean
        covariance += centred.T @ centred
    values, vectors = np.linalg.eigh(covariance / max(n, 1))
    order = np.argsort(values)[::-1][:d_out]
    values, vectors = np.clip(values[order], 0.0, None), vectors[:, order]
    if whiten:
        # total variance of unit rows = 1 - |mean|^2; each eigenvalue gets a small share of the mean one added so
        # that directions the sample does not span are not blown up by the inverse square root
        trace = max(1.0 - float(mean @ mean), 1e-12)
        vectors = vectors / np.sqrt(values + WHITEN_FLOOR * trace / d)
    return Pca(mean, vectors)


def cluster(features: np.ndarray, k: int, seed: int, *, pca_dim: int | None = None, whiten: bool = True,
            sample: int | None = None, chunk: int = DEFAULT_CHUNK, niter: int = 20, progress: bool = False,
            rows: np.ndarray | None = None) -> Clustering:
    """Spherical k-means of the rows of `features` [N, d] (or of features[rows] when `rows` is given) into k
    clusters, deterministic for a given seed.

    With whiten (or a pca_dim), a faiss PCAMatrix (eigen_power -1/2 when whitening) is trained on the sample;
    pca_dim None keeps all d dimensions. k-means trains on `sample` random rows (default max(256 k, 100,000),
    at most all rows); every row is then assigned in chunks of `chunk` rows."""
    n = len(rows) if rows is not None else len(features)
    if features.ndim != 2 or features.shape[1] < 1:
        raise UserError(f"features to cluster must be a 2-D array [pairs, dimensions], got shape {features.shape}")
    d = features.shape[1]
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= n:
        raise UserError(f"the number of clusters must be an integer from 1 to the {n} rows clustered, got {k!r}")
    if pca_dim is not None and not 1 <= pca_dim <= d:
        raise UserError(f"pca_dim must be from 1 to the feature dimension {d}, got {pca_dim!r}")
    if chunk < 1 or niter < 1:
        raise UserError(f"chunk and niter must be positive, got chunk={chunk}, niter={niter}")
    k = int(k)
    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    sample_size = min(n, int(sample) if sample is not None else max(POINTS_PER_CENTROID * k, MIN_SAMPLE))
    if sample_size < k:
        raise UserError(f"a k-means sample of {sample_size} rows cannot train {k} clusters")
    picked = np.sort(rng.choice(n, size=sample_size, replace=False)) if sample_size < n else None
    if rows is not None:
        picked = rows if picked is None else rows[picked]
    train = np.empty((sample_size, d), dtype=np.float32)
    for start, stop in _chunks(sample_size, chunk):
        train[start:stop] = take_rows(features, picked, start, stop)

    # (a sample of fewer rows than dimensions spans at most that many: PCA keeps those)
    pca = _fit_pca(train, min(pca_dim or d, sample_size), whiten) if (whiten or pca_dim is not None) else None
    transform = RowTransform(pca, d)
    train = transform.apply_normalized(train)

    kmeans = faiss.Kmeans(transform.d_out, k, niter=niter, seed=int(seed) % (2**31 - 1), spherical=True,
                          verbose=False, min_points_per_centroid=1,
                          max_points_per_centroid=max(POINTS_PER_CENTROID, math.ceil(sample_size / k)))
    kmeans.train(train)
    del train
    centroids = np.ascontiguousarray(kmeans.centroids, dtype=np.float32)
    train_seconds = time.perf_counter() - started

    index = faiss.IndexFlatIP(transform.d_out)
    index.add(centroids)
    assignment = np.empty(n, dtype=np.int64)
    distance = np.empty(n, dtype=np.float32)
    for start, stop in _progress(_chunks(n, chunk), math.ceil(n / chunk), "assigning", progress):
        block = transform.apply_normalized(take_rows(features, rows, start, stop))
        similarity, nearest = index.search(block, 1)
        assignment[start:stop] = nearest[:, 0]
        distance[start:stop] = np.clip(1.0 - similarity[:, 0], 0.0, 2.0)
    return Clustering(centroids, assignment, distance, transform, sample_size, train_seconds)
