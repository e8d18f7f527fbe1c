"""k-means coresets: joint features by hand, blob recovery, distinct picks, determinism, centroid means."""
from __future__ import annotations

import math

import pytest
import torch

from evaluation import coresets
from utils.cli import UserError

BLOB_SIZE = 30
CENTRES = torch.tensor([[0.0, 0.0, 0.0, 0.0], [40.0, 0.0, 0.0, 0.0], [0.0, 40.0, 0.0, 0.0]])


def blobs() -> torch.Tensor:
    """[90, 4]: rows 0-29 around CENTRES[0], 30-59 around CENTRES[1], 60-89 around CENTRES[2]."""
    noise = torch.randn(len(CENTRES) * BLOB_SIZE, 4, generator=torch.Generator().manual_seed(11))
    return CENTRES.repeat_interleave(BLOB_SIZE, dim=0) + noise


def test_methods_keep_their_seed_offsets():
    assert coresets.METHODS == ("random", "herding", "kcenter", "forgetting", "kmeans")


def test_joint_features_by_hand():
    images = torch.tensor([[3, 4], [0, -2]], dtype=torch.float64)
    texts = torch.tensor([[0, 0, 2], [1, 1, 0]], dtype=torch.float64)
    r = 1 / math.sqrt(2)
    expected = torch.tensor([[0.6, 0.8, 0.0, 0.0, 1.0], [0.0, -1.0, r, r, 0.0]])
    joint = coresets.joint_features(images, texts)
    assert joint.dtype == torch.float32 and joint.shape == (2, 5)
    torch.testing.assert_close(joint, expected)


@pytest.mark.slow
def test_kmeans_recovers_three_blobs():
    features = blobs()
    centroids, assignments = coresets.kmeans_clusters(features, 3, seed=0)
    assert centroids.shape == (3, 4) and centroids.dtype == torch.float32
    assert assignments.shape == (90,) and assignments.dtype == torch.long
    labels = assignments.view(3, BLOB_SIZE)
    assert (labels == labels[:, :1]).all(), "a blob was split between clusters"
    assert sorted(labels[:, 0].tolist()) == [0, 1, 2], "two blobs share a cluster"
    for blob in range(3):  # each centroid is its blob's mean
        members = features[blob * BLOB_SIZE:(blob + 1) * BLOB_SIZE]
        torch.testing.assert_close(centroids[labels[blob, 0]], members.mean(dim=0), atol=1e-4, rtol=0)


def test_select_kmeans_picks_the_point_nearest_each_blob_mean():
    features = blobs()
    _, assignments = coresets.kmeans_clusters(features, 3, seed=0)
    picks = coresets.select_kmeans(features, 3, seed=0)
    assert picks.dtype == torch.long and picks.shape == (3,)
    for blob in range(3):
        start = blob * BLOB_SIZE
        members = features[start:start + BLOB_SIZE].double()
        nearest = start + int(torch.linalg.vector_norm(members - members.mean(dim=0), dim=1).argmin())
        cluster = int(assignments[start])
        assert int(picks[cluster]) == nearest  # centroid order: cluster k's representative is picks[k]


def test_a_pair_claimed_by_an_earlier_centroid_goes_to_the_next_nearest():
    points = torch.tensor([[0.0], [1.0], [3.0], [10.0]])
    # All three centroids are nearest to point 1 (0.1 away), then point 0 (0.9), then point 2 (2.1).
    centroids = torch.full((3, 1), 0.9)
    assert coresets.nearest_distinct(points, centroids).tolist() == [1, 0, 2]


def test_select_kmeans_is_distinct_when_two_centroids_coincide(monkeypatch):
    points = torch.tensor([[0.0, 0.0], [0.5, 0.0], [9.0, 9.0], [10.0, 10.0]])
    twin = torch.tensor([[0.1, 0.0], [0.1, 0.0], [9.8, 9.8]])
    monkeypatch.setattr(coresets, "kmeans_clusters", lambda features, count, seed: (twin, torch.zeros(4).long()))
    assert coresets.select_kmeans(points, 3, seed=0).tolist() == [0, 1, 3]


def test_select_kmeans_gives_distinct_pairs_with_many_clusters():
    features = torch.randn(25, 3, generator=torch.Generator().manual_seed(2))
    picks = coresets.select_kmeans(features, 25, seed=4)
    assert sorted(picks.tolist()) == list(range(25))


def test_same_seed_same_result():
    features = torch.randn(80, 6, generator=torch.Generator().manual_seed(9))
    first_centroids, first_assignments = coresets.kmeans_clusters(features, 7, seed=123)
    again_centroids, again_assignments = coresets.kmeans_clusters(features, 7, seed=123)
    assert torch.equal(first_centroids, again_centroids)
    assert torch.equal(first_assignments, again_assignments)
    assert torch.equal(coresets.select_kmeans(features, 7, seed=123), coresets.select_kmeans(features, 7, seed=123))


def test_centroid_pairs_are_per_cluster_means_of_the_raw_features():
    generator = torch.Generator().manual_seed(6)
    images = 5 * torch.randn(50, 6, generator=generator) + 3
    texts = 2 * torch.randn(50, 4, generator=generator) - 1
    count = 5
    _, assignments = coresets.kmeans_clusters(coresets.joint_features(images, texts), count, seed=1)
    image_means, text_means = coresets.centroid_pairs(images, texts, assignments, count)
    assert image_means.shape == (count, 6) and text_means.shape == (count, 4)
    for k in range(count):
        members = [i for i in range(50) if int(assignments[i]) == k]
        assert members, f"cluster {k} is empty"
        torch.testing.assert_close(image_means[k], sum(images[i] for i in members) / len(members))
        torch.testing.assert_close(text_means[k], sum(texts[i] for i in members) / len(members))


def test_centroid_pairs_refuses_an_empty_cluster():
    images, texts = torch.randn(4, 3), torch.randn(4, 2)
    with pytest.raises(ValueError, match="no members"):
        coresets.centroid_pairs(images, texts, torch.tensor([0, 0, 2, 2]), 3)


def test_cluster_count_out_of_range_is_a_user_error():
    features = blobs()
    with pytest.raises(UserError, match=r"\b91\b.*\b90\b"):
        coresets.kmeans_clusters(features, 91, seed=0)
    with pytest.raises(UserError, match=r"\b0\b"):
        coresets.select_kmeans(features, 0, seed=0)
