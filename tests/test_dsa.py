"""Differentiable augmentation: replayable from its seed, differentiable, and actually augmenting."""
from __future__ import annotations

import pytest
import torch

from utils.dsa import DEFAULT_STRATEGY, check_strategy, dsa_augment


def test_same_seed_same_augmentation_and_gradients_flow():
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64, requires_grad=True)
    a, b = dsa_augment(x, DEFAULT_STRATEGY, seed=7), dsa_augment(x, DEFAULT_STRATEGY, seed=7)
    assert torch.equal(a, b) and a.shape == x.shape
    assert not torch.equal(a, dsa_augment(x, DEFAULT_STRATEGY, seed=8))
    a.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("op", ["color", "crop", "cutout", "flip", "scale", "rotate"])
def test_each_operation_changes_the_images_and_is_differentiable(op):
    torch.manual_seed(0)
    x = torch.randn(8, 3, 16, 16, dtype=torch.float64, requires_grad=True)
    y = dsa_augment(x, op, seed=3)
    assert not torch.allclose(y, x)
    small = torch.randn(2, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: dsa_augment(t, op, seed=3), (small,))


def test_flip_is_an_exact_mirror_for_the_flipped_images():
    x = torch.randn(16, 3, 4, 4)
    y = dsa_augment(x, "flip", seed=0)
    flipped = [torch.equal(y[i], x[i].flip(2)) for i in range(16)]
    kept = [torch.equal(y[i], x[i]) for i in range(16)]
    assert all(f or k for f, k in zip(flipped, kept)) and any(flipped) and any(kept)


def test_unknown_operation_is_refused():
    with pytest.raises(ValueError, match="unknown DSA operation"):
        check_strategy("color_blur")
