"""LoRS's learned similarity and soft-target losses, RepBlend's blending: exact values by hand."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from matching.trajectory import Students, blend, draw_blends, student_step_loss
from networks import ImageTextModel
from networks.contrastive import LOSS_TYPES, contrastive_loss, soft_target_loss
from networks.convnet import ConvNet
from networks.similarity import TargetSimilarity
from reparam_module import ReparamModule

LOGITS = torch.tensor([[2.0, -1.0], [0.5, 1.0]], dtype=torch.float64)
TARGETS = torch.tensor([[0.9, 0.2], [0.1, 0.7]], dtype=torch.float64)


def _sigmoid(x):
    return 1 / (1 + math.exp(-x))


def _bce(x, t):
    p = _sigmoid(x)
    return -(t * math.log(p) + (1 - t) * math.log(1 - p))


def test_soft_infonce_is_cross_entropy_against_rows_and_columns():
    rows = [[math.exp(v) for v in row] for row in LOGITS.tolist()]
    cols = [[math.exp(LOGITS[i, j].item()) for i in range(2)] for j in range(2)]
    by_row = -sum(TARGETS[i, j].item() * math.log(rows[i][j] / sum(rows[i])) for i in range(2) for j in range(2)) / 2
    by_col = -sum(TARGETS[i, j].item() * math.log(cols[j][i] / sum(cols[j])) for i in range(2) for j in range(2)) / 2
    assert soft_target_loss(LOGITS, TARGETS, "infonce").item() == pytest.approx((by_row + by_col) / 2, rel=1e-12)


def test_weighted_bce_averages_positives_and_negatives_separately():
    entries = {(i, j): _bce(LOGITS[i, j].item(), TARGETS[i, j].item()) for i in range(2) for j in range(2)}
    positives = [entries[0, 0], entries[1, 1]]  # targets 0.9 and 0.7 are above 0.5
    negatives = [entries[0, 1], entries[1, 0]]
    expected = (sum(positives) / 2 + sum(negatives) / 2) / 2
    assert soft_target_loss(LOGITS, TARGETS, "wbce").item() == pytest.approx(expected, rel=1e-12)
    skewed = torch.tensor([[0.9, 0.2, 0.1], [0.1, 0.8, 0.0], [0.0, 0.3, 0.6]], dtype=torch.float64)
    logits = torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    # three positives, six negatives: not the plain mean
    assert soft_target_loss(logits, skewed, "wbce").item() != pytest.approx(
        soft_target_loss(logits, skewed, "bce").item(), rel=1e-3)


def test_bce_mse_and_kl_by_hand():
    entries = [(LOGITS[i, j].item(), TARGETS[i, j].item()) for i in range(2) for j in range(2)]
    assert soft_target_loss(LOGITS, TARGETS, "bce").item() == pytest.approx(
        sum(_bce(x, t) for x, t in entries) / 4, rel=1e-12)
    assert soft_target_loss(LOGITS, TARGETS, "mse").item() == pytest.approx(
        sum((_sigmoid(x) - t) ** 2 for x, t in entries) / 4, rel=1e-12)

    def kl(logits, targets):
        total = 0.0
        for row, target in zip(logits.tolist(), targets.tolist()):
            q = [math.exp(10 * v) / sum(math.exp(10 * u) for u in target) for v in target]
            p = [math.exp(v) / sum(math.exp(u) for u in row) for v in row]
            total += sum(a * math.log(a / b) for a, b in zip(q, p))
        return total / logits.numel()  # LoRS's KLDivLoss(reduction="mean"): over all entries, not rows

    expected = (kl(LOGITS, TARGETS) + kl(LOGITS.t(), TARGETS.t())) / 2
    assert soft_target_loss(LOGITS, TARGETS, "kl").item() == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_identity_targets_are_the_default_and_every_loss_differs(loss_type):
    torch.manual_seed(0)
    image, text = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    eye = torch.eye(4, dtype=torch.float64)
    assert contrastive_loss(image, text, None, loss_type).item() == pytest.approx(
        contrastive_loss(image, text, eye, loss_type).item(), rel=1e-12)
    others = {other: contrastive_loss(image, text, None, other).item() for other in LOSS_TYPES if other != loss_type}
    assert all(value != pytest.approx(contrastive_loss(image, text, None, loss_type).item(), rel=1e-6)
               for value in others.values())
    with pytest.raises(ValueError, match="unknown loss type"):
        contrastive_loss(image, text, None, "hinge")


def test_soft_infonce_with_identity_targets_is_the_paper_loss():
    torch.manual_seed(1)
    image, text = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    logits = F.normalize(image, dim=1) @ F.normalize(text, dim=1).t() / 0.07
    labels = torch.arange(5)
    paper = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
    assert soft_target_loss(logits, torch.eye(5, dtype=torch.float64), "infonce").item() == pytest.approx(
        paper.item(), rel=1e-12)


def test_lowrank_similarity_starts_at_the_identity_and_its_gradient_flows():
    similarity = TargetSimilarity("lowrank", 6, rank=2, alpha=0.5)
    params = [t.double().requires_grad_(True) for t in similarity.initial_params(torch.Generator().manual_seed(0),
                                                                                 torch.device("cpu"))]
    diagonal, left, right = params
    assert diagonal.shape == (6,) and left.shape == right.shape == (6, 2)
    assert torch.equal(similarity.submatrix(params), torch.eye(6, dtype=torch.float64))
    indices = torch.tensor([4, 1, 3])
    sub = similarity.submatrix(params, indices)
    assert torch.equal(sub, torch.eye(3, dtype=torch.float64))
    torch.manual_seed(0)
    image, text = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    contrastive_loss(image, text, sub, "wbce").backward()
    assert diagonal.grad[indices].abs().min() > 0 and right.grad[indices].abs().sum() > 0
    assert diagonal.grad[[0, 2, 5]].abs().sum() == 0  # rows outside the minibatch get no gradient
    with torch.no_grad():  # after a step S = diag(a) + (alpha / r) L R^T, restricted to the minibatch rows
        right.add_(1.0)
    full = torch.diag(diagonal) + 0.5 / 2 * left @ right.t()
    torch.testing.assert_close(similarity.submatrix(params, indices), full[indices][:, indices])


def test_full_similarity_starts_at_the_identity_and_takes_the_submatrix():
    similarity = TargetSimilarity("full", 4)
    (matrix,) = similarity.initial_params(torch.Generator(), torch.device("cpu"))
    assert torch.equal(matrix, torch.eye(4))
    matrix = torch.arange(16.0).view(4, 4)
    assert torch.equal(similarity.submatrix([matrix], torch.tensor([2, 0])), torch.tensor([[10.0, 8.0], [2.0, 0.0]]))
    assert TargetSimilarity("none", 4).submatrix([], torch.tensor([0])) is None
    with pytest.raises(ValueError, match="unknown similarity"):
        TargetSimilarity("diagonal", 4)


def _student():
    torch.manual_seed(0)
    model = ImageTextModel(ConvNet(8, width=4), text_dim=5).double().eval()  # eval: no dropout, so comparable
    students = Students(ReparamModule(model.image_encoder), ReparamModule(model.text_projection))
    params_img = [p.detach() for p in model.image_encoder.parameters()]
    params_txt = [p.detach() for p in model.text_projection.parameters()]
    images = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    texts = torch.randn(4, 5, dtype=torch.float64)
    return students, images, texts, params_img, params_txt


def test_blending_with_lambda_one_is_the_unblended_loss_and_otherwise_mixes_both_modalities():
    students, images, texts, params_img, params_txt = _student()
    plain = student_step_loss(students, images, texts, params_img, params_txt)
    perm = torch.tensor([2, 0, 3, 1])
    unmixed = student_step_loss(students, images, texts, params_img, params_txt, mix=(1.0, perm))
    assert torch.equal(unmixed, plain)
    mixed = student_step_loss(students, images, texts, params_img, params_txt, mix=(0.3, perm))
    assert not torch.allclose(mixed, plain)
    x, y = blend(images[:, 0, 0, :2], texts, (0.3, perm))
    torch.testing.assert_close(x, 0.3 * images[:, 0, 0, :2] + 0.7 * images[perm, 0, 0, :2])
    torch.testing.assert_close(y, 0.3 * texts + 0.7 * texts[perm])


def test_blends_are_beta_distributed_and_replay_from_the_generator():
    blends = draw_blends(2000, 5, 0.5, torch.Generator().manual_seed(3))
    lams = torch.tensor([lam for lam, _ in blends])
    assert 0 <= lams.min() and lams.max() <= 1
    assert lams.mean().item() == pytest.approx(0.5, abs=0.03)
    assert lams.var().item() == pytest.approx(1 / 8, abs=0.01)  # Beta(a, a): variance 1 / (4 (2a + 1))
    assert all(sorted(perm.tolist()) == list(range(5)) for _, perm in blends)
    again = draw_blends(2000, 5, 0.5, torch.Generator().manual_seed(3))
    assert all(a == c and torch.equal(b, d) for (a, b), (c, d) in zip(blends, again))
