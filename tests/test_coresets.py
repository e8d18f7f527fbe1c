"""Coreset selection: hand-worked examples, brute-force references, determinism, BatchNorm statistics."""
from __future__ import annotations

import pytest
import torch
from conftest import tiny_flags
from torch import nn

from data.build import load_retrieval_data
from networks.contrastive import ImageTextModel
from evaluation import coresets


def brute_force_herding(features: torch.Tensor, count: int) -> list[int]:
    """Herding straight from its definition, one candidate at a time."""
    mean = features.mean(dim=0)
    picks: list[int] = []
    for k in range(count):
        best, best_gap = None, None
        for i in range(len(features)):
            if i in picks:
                continue
            gap = torch.linalg.vector_norm(mean - (features[picks].sum(dim=0) + features[i]) / (k + 1)).item()
            if best_gap is None or gap < best_gap:
                best, best_gap = i, gap
        picks.append(best)
    return picks


def brute_force_kcenter(features: torch.Tensor, count: int, first: int) -> list[int]:
    picks = [first]
    while len(picks) < count:
        gaps = [min(torch.dist(x, features[j]).item() for j in picks) for x in features]
        picks.append(max(range(len(features)), key=lambda i: (gaps[i], -i)))
    return picks


def test_herding_on_a_hand_worked_line():
    # Mean 3.25: first 2 (closest), then 1 (mean of {2,1} = 1.5 beats 6 and 1), then 10 ({2,1,10}: 4.33).
    points = torch.tensor([[0.0], [1.0], [2.0], [10.0]])
    assert coresets.select_herding(points, 4).tolist() == [2, 1, 3, 0]


def test_herding_matches_its_definition_on_random_points():
    features = torch.randn(40, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert coresets.select_herding(features, 12).tolist() == brute_force_herding(features, 12)


def test_kcenter_farthest_point_order_on_a_hand_worked_line():
    # From 0: 10 is farthest; then 4 (4 from 0, 6 from 10); then 1 and 3 tie at 1: the lower index wins.
    points = torch.tensor([[0.0], [1.0], [3.0], [10.0], [4.0]])
    assert coresets.select_kcenter(points, 4, first=0).tolist() == [0, 3, 4, 1]


def test_kcenter_matches_its_definition_on_random_points():
    features = torch.randn(30, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    assert coresets.select_kcenter(features, 10, first=7).tolist() == brute_force_kcenter(features, 10, 7)


def test_forgetting_counter_counts_correct_to_incorrect_transitions():
    counter = coresets.ForgettingCounter(4)
    eye = torch.eye(3)
    swapped = eye[[1, 0, 2]]  # pairs 0 and 1 retrieve each other's partner, pair 2 stays right
    counter.update(torch.tensor([0, 1, 2]), eye, eye)
    counter.update(torch.tensor([0, 1, 2]), eye, swapped)
    counter.update(torch.tensor([2, 0, 1]), eye, eye)  # all right again: no event
    counter.update(torch.tensor([2, 0, 1]), eye, swapped)  # batch pairs 0, 1 = pairs 2, 0 forgotten
    assert counter.events.tolist() == [2, 1, 1, 0]
    assert counter.ever_learned.tolist() == [True, True, True, False]


def test_forgetting_needs_both_directions_right():
    counter = coresets.ForgettingCounter(2)
    images = torch.tensor([[1.0, 0.0], [0.9, 0.1]])
    texts = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # Text 0 -> image 0 and image 0 -> text 0 are right; image 1's best text is text 0: pair 1 is wrong.
    counter.update(torch.tensor([0, 1]), images, texts)
    assert counter.ever_learned.tolist() == [True, False]


def test_most_forgotten_puts_never_learned_first_and_is_seeded():
    events = torch.tensor([0, 3, 1, 3, 2, 0])
    learned = torch.tensor([True, True, True, True, True, False])
    picks = [coresets.select_most_forgotten(events, learned, 4, torch.Generator().manual_seed(s)) for s in range(6)]
    for chosen in picks:
        assert chosen[0] == 5 and set(chosen[1:3].tolist()) == {1, 3} and chosen[3] == 4
    assert len({tuple(c.tolist()) for c in picks}) == 2  # the 1/3 tie goes both ways over seeds
    again = coresets.select_most_forgotten(events, learned, 4, torch.Generator().manual_seed(0))
    assert torch.equal(again, picks[0])


def test_random_selection_is_seeded_and_distinct():
    a = coresets.select_random(50, 20, torch.Generator().manual_seed(1))
    b = coresets.select_random(50, 20, torch.Generator().manual_seed(1))
    c = coresets.select_random(50, 20, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert len(set(a.tolist())) == 20 and 0 <= a.min() and a.max() < 50


class TinyBatchNormEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4)
        self.num_features = 4

    def forward(self, x):
        return self.norm(self.conv(x)).mean(dim=(2, 3))


def test_pair_features_recompute_batchnorm_statistics_and_are_normalised(tiny_shapes, cache_dir):
    from data.datasets import load_rgb
    from data.transforms import test_transform
    from evaluate import parse_args
    from settings import programs

    settings = programs.from_namespace("evaluate", parse_args(tiny_flags(tiny_shapes, cache_dir, "--full"))[0])
    data = load_retrieval_data(settings.data, settings.model, torch.device("cpu"), progress=False)
    torch.manual_seed(0)
    model = ImageTextModel(TinyBatchNormEncoder(), data.text_dim)
    features = coresets.pair_features(model, data, 16, 8, 0, torch.device("cpu"), progress=False)
    assert features.shape == (len(data.train.captions), 8)
    halves = features[:, :4].norm(dim=1), features[:, 4:].norm(dim=1)
    assert torch.allclose(halves[0], torch.ones(len(features))) and torch.allclose(halves[1], torch.ones(len(features)))
    # Two captions of the same image share the image half.
    first, second = data.train.img2txt[0][:2]
    assert torch.equal(features[first, :4], features[second, :4])
    # The running statistics are the average over the training-image batches (8 images each) of
    # the batch statistics of the conv outputs, not the initial zeros and ones.
    transform = test_transform(16)
    with torch.no_grad():
        conv = model.image_encoder.conv(torch.stack([transform(load_rgb(p)) for p in data.train.image_paths]))
    batches = conv.split(8)
    mean = torch.stack([b.mean(dim=(0, 2, 3)) for b in batches]).mean(dim=0)
    var = torch.stack([b.var(dim=(0, 2, 3), unbiased=True) for b in batches]).mean(dim=0)
    assert torch.allclose(model.image_encoder.norm.running_mean, mean, atol=1e-5)
    assert torch.allclose(model.image_encoder.norm.running_var, var, rtol=1e-4)
    assert not torch.allclose(var, torch.ones(4), rtol=0.05)


@pytest.mark.parametrize("count,num_pairs,message", [(0, 10, "at least 1"), (11, 10, "larger than the 10")])
def test_check_count_rejects_impossible_sizes(count, num_pairs, message):
    from utils.cli import UserError

    with pytest.raises(UserError, match=message):
        coresets.check_count(count, num_pairs)
