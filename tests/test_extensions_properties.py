"""Property tier for the extensions: LoRS's low-rank similarity at initialisation, the soft-target losses at
identity targets (the soft InfoNCE is the paper's loss to the bit), the LoRS loss reductions, and RepBlend's
symmetric projection matching (swapping the modalities swaps the matching terms and their gradients)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from matching.trajectory import Segment, Students, blend, contrastive_step_loss, unroll
from networks.contrastive import LOSS_TYPES, contrastive_loss, soft_target_loss
from networks.projection import ProjectionHead
from networks.similarity import TargetSimilarity
from reparam_module import ReparamModule

pytestmark = pytest.mark.props

PROPERTY = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])
SEEDS = st.integers(0, 2**31 - 1)


def _randn(generator: torch.Generator, *shape: int, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=generator, dtype=dtype)


# ---- LoRS: the low-rank similarity at initialisation (LoRA-style: R = 0) ---------------------------------------


@st.composite
def lowrank_setups(draw):
    size = draw(st.integers(2, 24))
    rank = draw(st.integers(1, size))
    alpha = draw(st.floats(0.01, 100.0)) * draw(st.sampled_from([1.0, -1.0]))
    batch = draw(st.integers(2, size))
    return size, rank, alpha, batch, draw(SEEDS)


@pytest.mark.slow
@PROPERTY
@given(lowrank_setups(), st.sampled_from(LOSS_TYPES))
def test_lowrank_similarity_starts_at_the_identity_and_only_its_left_factor_gets_no_gradient(setup, loss_type):
    size, rank, alpha, batch, seed = setup
    generator = torch.Generator().manual_seed(seed)
    similarity = TargetSimilarity("lowrank", size, rank=rank, alpha=alpha)
    params = [t.double().requires_grad_(True) for t in similarity.initial_params(generator, torch.device("cpu"))]
    diagonal, left, right = params
    assert sum(p.numel() for p in params) == size * (2 * rank + 1)
    assert sum(p.numel() for p in TargetSimilarity("full", size).initial_params(generator, torch.device("cpu"))) \
        == size * size
    assert TargetSimilarity("none", size).initial_params(generator, torch.device("cpu")) == []
    assert left.abs().sum() > 0 and torch.count_nonzero(right) == 0
    full = similarity.submatrix(params)
    assert torch.equal(full, torch.eye(size, dtype=torch.float64))

    # any loss: an arbitrary upstream gradient on the whole of S
    upstream = _randn(generator, size, size)
    grad_diagonal, grad_left, grad_right = torch.autograd.grad(full, params, grad_outputs=upstream)
    assert torch.count_nonzero(grad_left) == 0
    assert torch.equal(grad_diagonal, upstream.diagonal())
    assert torch.count_nonzero(grad_right) > 0

    # a soft-target loss on a minibatch's S[idx, idx], as a student step uses it
    indices = torch.randperm(size, generator=generator)[:batch]
    sub = similarity.submatrix(params, indices)
    assert torch.equal(sub, torch.eye(batch, dtype=torch.float64))
    images, texts = _randn(generator, batch, 5), _randn(generator, batch, 5)
    grad_diagonal, grad_left, grad_right = torch.autograd.grad(contrastive_loss(images, texts, sub, loss_type), params)
    assert torch.count_nonzero(grad_left) == 0
    assert torch.count_nonzero(grad_diagonal[indices]) > 0 and torch.count_nonzero(grad_right[indices]) > 0
    outside = torch.ones(size, dtype=torch.bool)
    outside[indices] = False
    assert torch.count_nonzero(grad_diagonal[outside]) == 0 and torch.count_nonzero(grad_right[outside]) == 0


# ---- soft-target losses at identity targets ---------------------------------------------------------------------


@st.composite
def feature_pairs(draw, dtype=torch.float32):
    pairs, dim, seed = draw(st.integers(2, 80)), draw(st.integers(1, 40)), draw(SEEDS)
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    generator = torch.Generator().manual_seed(seed)
    return _randn(generator, pairs, dim, dtype=dtype) * scale, _randn(generator, pairs, dim, dtype=dtype) * scale


def _loss_and_gradients(images, texts, targets):
    images, texts = images.clone().requires_grad_(True), texts.clone().requires_grad_(True)
    loss = contrastive_loss(images, texts, targets)
    grad_images, grad_texts = torch.autograd.grad(loss, (images, texts), create_graph=True)
    second = torch.autograd.grad(grad_images.sin().sum() + grad_texts.pow(2).sum(), (images, texts))
    return [loss, grad_images, grad_texts, *second]


@pytest.mark.slow
@PROPERTY
@given(st.one_of(feature_pairs(torch.float32), feature_pairs(torch.float64)))
def test_soft_infonce_with_identity_targets_is_the_hard_label_loss_to_the_bit(features):
    images, texts = features
    hard = _loss_and_gradients(images, texts, None)
    soft = _loss_and_gradients(images, texts, torch.eye(len(images), dtype=images.dtype))
    for got, expected in zip(soft, hard):  # value, first-order and second-order gradients
        assert torch.equal(got, expected)


@st.composite
def logits_and_targets(draw):
    rows, cols, seed = draw(st.integers(2, 12)), draw(st.integers(2, 12)), draw(SEEDS)
    generator = torch.Generator().manual_seed(seed)
    return _randn(generator, rows, cols) * 3, torch.rand(rows, cols, generator=generator, dtype=torch.float64)


@pytest.mark.slow
@PROPERTY
@given(logits_and_targets())
def test_lors_reductions_kl_over_all_entries_and_wbce_halves(case):
    logits, targets = case
    # kl: KLDivLoss(reduction="mean") with softmax(10 targets) as the target distribution, rows and columns
    def kl(x, t):
        q = torch.softmax(10 * t, dim=1)
        return (q * (q.log() - torch.log_softmax(x, dim=1))).sum() / x.numel()
    torch.testing.assert_close(soft_target_loss(logits, targets, "kl"),
                               (kl(logits, targets) + kl(logits.t(), targets.t())) / 2, rtol=1e-10, atol=1e-14)
    # wbce: (positives' mean + negatives' mean) / 2, a part with no entries counting as 0
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    positive = targets > 0.5
    means = [bce[mask].mean() if mask.any() else torch.zeros((), dtype=torch.float64)
             for mask in (positive, ~positive)]
    torch.testing.assert_close(soft_target_loss(logits, targets, "wbce"), (means[0] + means[1]) / 2,
                               rtol=1e-12, atol=0.0)
    negatives_only = targets * 0.5
    torch.testing.assert_close(soft_target_loss(logits, negatives_only, "wbce"),
                               soft_target_loss(logits, negatives_only, "bce") / 2, rtol=1e-12, atol=0.0)
    positives_only = 0.5 + targets * 0.5 + 1e-3
    torch.testing.assert_close(soft_target_loss(logits, positives_only, "wbce"),
                               soft_target_loss(logits, positives_only, "bce") / 2, rtol=1e-12, atol=0.0)


# ---- RepBlend: symmetric projection matching --------------------------------------------------------------------


@PROPERTY
@given(hnp.arrays(np.float64, st.tuples(st.integers(1, 8), st.integers(1, 6)),
                  elements=st.floats(allow_nan=False, allow_infinity=False)),
       st.integers(1, 6), SEEDS)
def test_blending_with_lambda_one_returns_both_modalities_unchanged(images, text_dim, seed):
    generator = torch.Generator().manual_seed(seed)
    images = torch.from_numpy(images)
    texts = _randn(generator, len(images), text_dim) * 1e200
    perm = torch.randperm(len(images), generator=generator)
    x, y = blend(images, texts, (1.0, perm))
    assert torch.equal(x, images) and torch.equal(y, texts)


def _head(dim: int, seed: int) -> ReparamModule:
    torch.manual_seed(seed)
    return ReparamModule(ProjectionHead(dim, dim, dropout=0.0).double().eval())


@st.composite
def symmetric_setups(draw):
    pairs, dim = draw(st.integers(2, 6)), draw(st.integers(2, 5))
    mini = draw(st.integers(2, pairs))
    steps = draw(st.integers(1, 3))
    lams = draw(st.lists(st.floats(0.0, 1.0), min_size=steps, max_size=steps))
    return pairs, dim, mini, lams, draw(st.sampled_from(LOSS_TYPES)), draw(SEEDS)


def _matching(students, learned, lr_img, lr_txt, segment, batches, blends, loss_type, pairs):
    step_loss = contrastive_step_loss(students, batches, similarity=TargetSimilarity("full", pairs),
                                      loss_type=loss_type, blends=blends, features_given=True)
    result = unroll(students, step_loss, len(batches), learned, lr_img, lr_txt, segment)
    return result, torch.autograd.grad(result.total, [*learned, lr_img, lr_txt])


@pytest.mark.slow
@PROPERTY
@given(symmetric_setups())
def test_swapping_the_modalities_swaps_the_matching_terms_and_their_gradients(setup):
    pairs, dim, mini, lams, loss_type, seed = setup
    generator = torch.Generator().manual_seed(seed)
    students = Students(_head(dim, seed), _head(dim, seed + 1), frozen_encoder=torch.nn.Identity())
    theta1, theta2 = students.image.flat_param(), students.text.flat_param()
    target1 = theta1 + 0.1 * _randn(generator, len(theta1))
    target2 = theta2 + 0.1 * _randn(generator, len(theta2))
    images = _randn(generator, pairs, dim).requires_grad_(True)
    texts = _randn(generator, pairs, dim).requires_grad_(True)
    sim = (torch.eye(pairs, dtype=torch.float64) + 0.3 * _randn(generator, pairs, pairs)).requires_grad_(True)
    sim_t = sim.detach().t().clone().requires_grad_(True)
    lr_a = torch.tensor(0.5 + torch.rand((), generator=generator, dtype=torch.float64).item(), requires_grad=True)
    lr_b = torch.tensor(0.5 + torch.rand((), generator=generator, dtype=torch.float64).item(), requires_grad=True)
    batches = [torch.randperm(pairs, generator=generator)[:mini] for _ in lams]
    blends = [(lam, torch.randperm(mini, generator=generator)) for lam in lams]

    first, (g_images, g_texts, g_sim, g_lr_a, g_lr_b) = _matching(
        students, (images, texts, sim), lr_a, lr_b, Segment(theta1, theta2, target1, target2, 0), batches, blends,
        loss_type, pairs)
    swapped, (s_texts, s_images, s_sim_t, s_lr_b, s_lr_a) = _matching(
        students, (texts, images, sim_t), lr_b, lr_a, Segment(theta2, theta1, target2, target1, 0), batches, blends,
        loss_type, pairs)

    close = dict(rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(swapped.image_term, first.text_term, **close)
    torch.testing.assert_close(swapped.text_term, first.image_term, **close)
    torch.testing.assert_close(swapped.total, first.total, **close)
    for got, expected in [(s_images, g_images), (s_texts, g_texts), (s_sim_t, g_sim.t()), (s_lr_a, g_lr_a),
                          (s_lr_b, g_lr_b)]:
        torch.testing.assert_close(got, expected, **close)
    assert g_images.abs().sum() > 0 and g_texts.abs().sum() > 0 and g_lr_a != 0 and g_lr_b != 0
