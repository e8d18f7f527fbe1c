"""Selection methods of data reduction against hand-computed answers on tiny inputs, and the faiss clustering."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from reduction.cluster import cluster
from reduction.select import (PairFeatures, SelectOptions, best_captions, dedup_cluster, parse_methods, quotas,
                              select)
from utils.errors import UserError


def unit(*rows) -> np.ndarray:
    x = np.array(rows, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# Six pairs in 3-D around e0; the largest cosine between two different ones is 0.6 (rows 0 and 1..4).
SIX = [[1, 0, 0], [0.6, 0.8, 0], [0.6, -0.8, 0], [0.6, 0, 0.8], [0.6, 0, -0.8]]


def one_cluster(**changes) -> SelectOptions:
    return SelectOptions(clusters=1, **changes)


# ---- semdedup -------------------------------------------------------------------------------------------------

def test_semdedup_drops_the_later_of_an_exact_duplicate():
    features = PairFeatures(unit(*SIX, SIX[1]))  # row 5 = row 1
    chosen = select("semdedup", 5 / 6, features, one_cluster(epsilon=0.1))
    assert chosen.kept.tolist() == [0, 1, 2, 3, 4]
    stage = chosen.stages[0]
    assert stage == {"method": "semdedup", "pairs_in": 6, "pairs_out": 5, "seconds": stage["seconds"],
                     "clusters": 1, "cluster_seconds": stage["cluster_seconds"],
                     "train_seconds": stage["train_seconds"]}


def test_semdedup_with_epsilon_zero_drops_nothing():
    features = PairFeatures(unit(*SIX, SIX[1]))
    assert select("semdedup", 1.0, features, one_cluster(epsilon=0.0)).kept.tolist() == list(range(6))


def test_semdedup_keeps_one_of_a_triple():
    features = PairFeatures(unit(*SIX, SIX[2], SIX[2]))  # rows 2, 5, 6 are one vector
    assert select("semdedup", 5 / 7, features, one_cluster(epsilon=0.1)).kept.tolist() == [0, 1, 2, 3, 4]


def test_semdedup_keeps_the_near_duplicate_farther_from_the_centroid():
    # row 1 (0.62, 0.78) and row 5 (0.6, 0.8) are near-duplicates (cosine 0.9996). The centroid of the one
    # cluster leans to +y, cosine 0.760 with row 1 and 0.742 with row 5: row 5 is farther, visited first, kept.
    features = PairFeatures(unit([1, 0, 0], [0.62, 0.78, 0], *SIX[2:], SIX[1]))
    chosen = select("semdedup", 5 / 6, features, one_cluster(epsilon=0.1))
    assert chosen.kept.tolist() == [0, 2, 3, 4, 5]
    assert chosen.scores[5] > chosen.scores[1]  # scores: distance to the centroid


def test_dedup_compares_with_kept_rows_only_across_block_sizes():
    # angles 0, 10, 20 degrees; threshold cos 15: 0-10 and 10-20 are duplicates, 0-20 not. Row 1 goes, and
    # row 2 stays because its only close neighbour (row 1) was not kept.
    rows = np.array([[math.cos(math.radians(a)), math.sin(math.radians(a))] for a in (0, 10, 20)], np.float32)
    for block in (1, 2, 3, 4096):
        assert dedup_cluster(rows, math.cos(math.radians(15)), block=block).tolist() == [True, False, True]


def test_dedup_blocks_and_kept_chunks_do_not_change_the_answer():
    rng = np.random.default_rng(3)
    base = rng.standard_normal((60, 8)).astype(np.float32)
    rows = np.concatenate([base, base[rng.integers(0, 60, 40)] + 0.01 * rng.standard_normal((40, 8))])
    rows = unit(*rows[rng.permutation(100)])
    whole = dedup_cluster(rows, 0.95, block=4096)
    assert 55 <= whole.sum() <= 60
    assert (dedup_cluster(rows, 0.95, block=7, kept_chunk=5) == whole).all()


# ---- prototypes, alignment, random ------------------------------------------------------------------------------

def two_clusters() -> PairFeatures:
    """Rows 0-2 around e0 (centroid e0: distances 0, 0.2, 0.2); rows 3-5 around -e0 (distances 0, 0.4, 0.4).
    Antipodal, so that k-means finds the two from any start."""
    return PairFeatures(unit([1, 0, 0], [0.8, 0.6, 0], [0.8, -0.6, 0], [-1, 0, 0], [-0.6, 0, 0.8], [-0.6, 0, -0.8]))


def test_prototype_hard_keeps_the_outliers_and_easy_the_centres():
    features, options = two_clusters(), SelectOptions(clusters=2)
    hard = select("prototype_hard", 4 / 6, features, options)
    assert hard.kept.tolist() == [1, 2, 4, 5]
    assert len(set(hard.clusters[:3])) == 1 and len(set(hard.clusters[3:])) == 1
    assert hard.clusters[0] != hard.clusters[3]
    np.testing.assert_allclose(hard.scores, [0, 0.2, 0.2, 0, 0.4, 0.4], atol=1e-5)
    assert select("prototype_hard", 2 / 6, features, options).kept.tolist() == [4, 5]
    assert select("prototype_easy", 2 / 6, features, options).kept.tolist() == [0, 3]
    assert select("prototype_easy", 4 / 6, features, options).kept.tolist() == [0, 1, 2, 3]  # 0.2 tie: lower


def test_alignment_keeps_the_top_with_stable_ties():
    features = PairFeatures(unit(*SIX, SIX[0]), alignment=np.array([0.1, 0.5, 0.5, 0.3, 0.9, 0.5], np.float32))
    chosen = select("alignment", 0.5, features, SelectOptions())
    assert chosen.kept.tolist() == [1, 2, 4]
    assert chosen.clusters is None and chosen.scores.tolist() == features.alignment.tolist()


def test_random_is_seeded_distinct_and_of_the_right_size():
    features = PairFeatures(np.ones((1000, 2), np.float32))
    first = select("random", 0.137, features, SelectOptions(seed=5)).kept
    assert len(first) == 137 and len(set(first.tolist())) == 137 and (np.diff(first) > 0).all()
    assert (select("random", 0.137, features, SelectOptions(seed=5)).kept == first).all()
    assert not np.array_equal(select("random", 0.137, features, SelectOptions(seed=6)).kept, first)


# ---- balanced and quotas ----------------------------------------------------------------------------------------

def three_blobs() -> tuple[PairFeatures, np.ndarray]:
    """80 pairs in blobs of 40, 20, 20 (8-D); alignment puts exactly the top half of each blob above the median."""
    rng = np.random.default_rng(0)
    blob = np.repeat([0, 1, 2], [40, 20, 20])
    embedding = np.eye(8, dtype=np.float32)[blob] + 0.05 * rng.standard_normal((80, 8)).astype(np.float32)
    alignment = np.empty(80, np.float32)
    for b in range(3):
        members = rng.permutation(np.flatnonzero(blob == b))
        half = len(members) // 2
        alignment[members[:half]] = 0.6 + 0.3 * rng.random(half)
        alignment[members[half:]] = 0.1 + 0.3 * rng.random(len(members) - half)
    return PairFeatures(embedding, alignment=alignment), blob


def test_balanced_takes_the_same_share_of_every_cluster_among_the_better_aligned():
    features, blob = three_blobs()
    options = SelectOptions(clusters=3, pca_dim=2, seed=2)
    chosen = select("balanced", 0.25, features, options)
    clustered = chosen.clusters >= 0
    # precondition (k-means from a random start may merge blobs; this seed finds them): one cluster per blob
    assert all(len(set(chosen.clusters[clustered & (blob == b)])) == 1 for b in range(3))
    assert len(set(chosen.clusters[clustered])) == 3
    assert len(chosen.kept) == 20
    assert np.bincount(blob[chosen.kept], minlength=3).tolist() == [10, 5, 5]  # survivors 20/10/10, a half each
    assert (features.alignment[chosen.kept] >= 0.6).all()
    assert int(np.argmin(features.alignment)) not in chosen.kept
    assert (clustered == (features.alignment > 0.5)).all()  # the filtered half was not clustered
    assert (select("balanced", 0.25, features, options).kept == chosen.kept).all()


def test_balanced_raises_the_filter_to_the_target():
    features, blob = three_blobs()
    chosen = select("balanced", 0.75, features, SelectOptions(clusters=3, pca_dim=2))
    assert chosen.kept.tolist() == np.sort(np.argsort(-features.alignment)[:60]).tolist()  # the filter keeps 60


def test_quotas_largest_remainder_and_spill_over():
    assert quotas(4, [3, 3, 3], [3, 3, 3]).tolist() == [2, 1, 1]
    assert quotas(7, [4, 2, 1], [4, 2, 1]).tolist() == [4, 2, 1]
    assert quotas(6, [0.8, 0.1, 0.1], [2, 5, 5]).tolist() == [2, 2, 2]  # cluster 0 is full; 4 go to the others
    assert quotas(5, [0.8, 0.1, 0.1], [2, 5, 5]).tolist() == [2, 2, 1]
    assert quotas(3, [1.0, 0.0, 0.0], [1, 4, 4]).tolist() == [1, 1, 1]  # no weight left: shared by capacity
    with pytest.raises(UserError, match="cannot take 9 pairs from clusters that hold 8"):
        quotas(9, [1, 1], [4, 4])


def test_density_keeps_the_target_and_records_its_clusters():
    features, blob = three_blobs()
    chosen = select("density", 0.25, features, SelectOptions(clusters=3))
    assert len(chosen.kept) == 20 and chosen.options["effective_clusters"] == {"density": 3}


# ---- combinations, captions, options ----------------------------------------------------------------------------

def test_semdedup_then_alignment_maps_back_to_the_original_indices():
    alignment = np.array([0.1, 0.2, 0.9, 0.3, 0.8, 1.0], np.float32)  # row 5, the duplicate, is the best aligned
    features = PairFeatures(unit(*SIX, SIX[1]), alignment=alignment)
    chosen = select("semdedup+alignment", 2 / 6, features, one_cluster(epsilon=0.1))
    assert chosen.kept.tolist() == [2, 4]
    assert [(s["method"], s["pairs_in"], s["pairs_out"]) for s in chosen.stages] == [("semdedup", 6, 5),
                                                                                      ("alignment", 5, 2)]
    assert np.isnan(chosen.scores[5]) and chosen.scores[2] == pytest.approx(0.9)
    assert (chosen.clusters == 0).all()  # semdedup's clusters: the last stage that clustered
    assert select(["semdedup", "alignment"], 2 / 6, features, one_cluster(epsilon=0.1)).kept.tolist() == [2, 4]


def test_a_filter_shrinks_the_clusters_of_the_next_stage_and_options_record_it():
    features = two_clusters()
    features.alignment = np.array([0.9, 0.1, 0.2, 0.8, 0.7, 0.3], np.float32)
    chosen = select("alignment+prototype_easy", 2 / 6, features, SelectOptions(clusters=4))
    assert chosen.stages[0]["pairs_out"] == 3  # filter_fraction 0.5 of 6
    assert chosen.options["effective_clusters"] == {"prototype_easy": 3}
    assert chosen.kept.tolist() == [0, 3]  # three pairs, three clusters: every distance 0, lower indices win
    assert json.loads(json.dumps(chosen.options))["target"] == 2


def test_best_captions_keeps_the_best_aligned_captions_of_each_image():
    alignment = np.array([0.5, 0.9, 0.1, 0.7, 0.7, 0.2], np.float32)
    image = np.array([0, 0, 0, 1, 1, 2])
    assert best_captions(alignment, image, 1).tolist() == [1, 3, 5]
    assert best_captions(alignment, image, 2).tolist() == [0, 1, 3, 4, 5]
    with pytest.raises(UserError, match="captions per image must be a positive integer, got 0"):
        best_captions(alignment, image, 0)


# ---- bad input --------------------------------------------------------------------------------------------------

TINY = PairFeatures(unit(*SIX, SIX[1]), alignment=np.linspace(0, 1, 6, dtype=np.float32))


@pytest.mark.props
@settings(max_examples=40, deadline=None)
@given(st.one_of(st.floats(max_value=0.0), st.floats(min_value=1.0, exclude_min=True),
                 st.sampled_from([math.nan, math.inf, -math.inf])))
def test_keep_outside_zero_one_is_a_user_error(keep):
    with pytest.raises(UserError, match=r"keep must be a fraction of the pairs in \(0, 1\], got"):
        select("random", keep, TINY, SelectOptions())


def test_bad_methods_and_options_are_user_errors():
    with pytest.raises(UserError, match="unknown selection method 'semdedupe' \\(did you mean semdedup\\?\\); "
                                        "choose from random, alignment"):
        select("semdedupe", 0.5, TINY, SelectOptions())
    with pytest.raises(UserError, match="random can only be the last method"):
        parse_methods("random+alignment")
    with pytest.raises(UserError, match="balanced ranks pairs by their image-text alignment, which was not given: "
                                        "an aligned space is needed"):
        select("balanced", 0.5, PairFeatures(TINY.embedding), SelectOptions(clusters=2))
    with pytest.raises(UserError, match=r"clusters \(7\) is more than the 6 pairs to select from"):
        select("prototype_hard", 0.5, TINY, SelectOptions(clusters=7))
    with pytest.raises(UserError, match="the number of clusters must be an integer from 1 to the 6 rows"):
        cluster(TINY.embedding, 7, seed=0)
    with pytest.raises(UserError, match="semdedup with epsilon 0.1 left 5 of 6 pairs, fewer than the 6 asked for; "
                                        "lower epsilon or keep less"):
        select("semdedup", 1.0, TINY, one_cluster(epsilon=0.1))


# ---- cluster() --------------------------------------------------------------------------------------------------

def blob_features(n: int = 600, d: int = 16) -> np.ndarray:
    rng = np.random.default_rng(7)
    centres = rng.standard_normal((12, d)).astype(np.float32)
    return centres[rng.integers(0, 12, n)] + 0.3 * rng.standard_normal((n, d)).astype(np.float32)


@pytest.mark.parametrize("whiten, pca_dim", [(True, None), (False, None), (True, 8)])
def test_cluster_is_deterministic_and_assigns_the_nearest_centroid(whiten, pca_dim):
    x = blob_features()
    first = cluster(x, 12, seed=3, whiten=whiten, pca_dim=pca_dim)
    second = cluster(x, 12, seed=3, whiten=whiten, pca_dim=pca_dim)
    assert (first.assignment == second.assignment).all() and np.array_equal(first.centroids, second.centroids)
    assert first.centroids.shape == (12, pca_dim or 16) and first.centroids.dtype == np.float32
    assert first.assignment.dtype == np.int64 and first.distance.dtype == np.float32
    space = first.transform(x).astype(np.float64)
    np.testing.assert_allclose(np.linalg.norm(space, axis=1), 1, atol=1e-5)
    similarity = space @ first.centroids.T.astype(np.float64)
    assert (first.assignment == similarity.argmax(axis=1)).mean() > 0.99  # float32 near-ties aside
    np.testing.assert_allclose(first.distance, 1 - similarity.max(axis=1), atol=1e-4)


def test_chunked_assignment_equals_one_chunk_and_memmap_and_rows_work(tmp_path):
    x = blob_features()
    whole = cluster(x, 12, seed=1)
    chunked = cluster(x, 12, seed=1, chunk=37)
    assert (chunked.assignment == whole.assignment).all()
    np.testing.assert_allclose(chunked.distance, whole.distance, atol=1e-6)
    np.save(tmp_path / "x.npy", x)
    mapped = np.load(tmp_path / "x.npy", mmap_mode="r")
    from_disk = cluster(mapped, 12, seed=1, chunk=100)
    assert (from_disk.assignment == whole.assignment).all()
    rows = np.arange(0, 600, 3)
    subset = cluster(mapped, 5, seed=2, rows=rows, chunk=64)
    direct = cluster(x[rows], 5, seed=2)
    assert (subset.assignment == direct.assignment).all() and len(subset.assignment) == 200


# ---- the class of inputs: any method, any fraction, any small feature set ----------------------------------------

COMBINATIONS = ["random", "alignment", "prototype_hard", "prototype_easy", "semdedup", "balanced", "density",
                "semdedup+balanced", "alignment+prototype_easy", "semdedup+random"]


@settings(max_examples=40, deadline=None)
@given(method=st.sampled_from(COMBINATIONS), n=st.integers(6, 60), d=st.integers(2, 6),
       keep=st.floats(0.0, 1.0, exclude_min=True), seed=st.integers(0, 2**31 - 1), clusters=st.integers(1, 6),
       data=st.data())
@pytest.mark.props
def test_every_method_keeps_round_keep_n_distinct_pairs_reproducibly(method, n, d, keep, seed, clusters, data):
    """Whatever the method, the fraction and the features: exactly round(keep · N) (at least 1) distinct sorted
    indices into the N pairs, the same ones again for the same seed, scores and clusters one per pair; the only
    refusal allowed is SemDeDup leaving fewer pairs than asked."""
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="features"))
    embedding = rng.standard_normal((n, d)).astype(np.float32)
    if data.draw(st.booleans(), label="duplicates"):
        embedding[n // 2:] = embedding[: n - n // 2]  # exact copies: SemDeDup's case
    features = PairFeatures(embedding, alignment=rng.uniform(-1, 1, n).astype(np.float32),
                            image_of_pair=np.arange(n) // 2)
    options = SelectOptions(seed=seed, clusters=min(clusters, n))
    try:
        chosen = select(method, keep, features, options)
    except UserError as err:
        assert "semdedup" in method and "fewer than the" in str(err), err
        return
    target = max(1, math.floor(keep * n + 0.5))
    kept = chosen.kept
    assert len(kept) == target and kept.dtype == np.int64
    assert (np.diff(kept) > 0).all() and kept.min() >= 0 and kept.max() < n
    assert np.array_equal(select(method, keep, features, options).kept, kept)
    for per_pair in (chosen.scores, chosen.clusters):
        assert per_pair is None or len(per_pair) == n
    assert sum(stage["pairs_out"] <= stage["pairs_in"] for stage in chosen.stages) == len(chosen.stages)
    assert chosen.stages[-1]["pairs_out"] == target
    json.dumps(chosen.options)  # what the report writes
