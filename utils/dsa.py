"""Differentiable augmentation of synthetic images (opt-in `--dsa True`).

The reference parses `--dsa` but never applies it; here it is available, default off. Each
operation draws per-image parameters from an explicit `torch.Generator`, so a step's augmentation
can be replayed exactly; every operation is differentiable w.r.t. the pixels.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

DEFAULT_STRATEGY = "color_crop_cutout_flip_scale_rotate"
OPERATIONS = ("color", "crop", "cutout", "flip", "scale", "rotate")


def _uniform(n: int, generator: torch.Generator, low: float, high: float, like: torch.Tensor) -> torch.Tensor:
    return (torch.rand(n, generator=generator) * (high - low) + low).to(device=like.device, dtype=like.dtype)


def _affine(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")


def _color(x, g):
    n = len(x)
    x = x + (_uniform(n, g, -0.5, 0.5, x)).view(n, 1, 1, 1)  # brightness
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * _uniform(n, g, 0.0, 2.0, x).view(n, 1, 1, 1) + mean  # saturation
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * _uniform(n, g, 0.5, 1.5, x).view(n, 1, 1, 1) + mean  # contrast


def _translation(x, g, ratio=0.125):
    n = len(x)
    theta = torch.zeros(n, 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    theta[:, :, 2] = torch.stack([_uniform(n, g, -2 * ratio, 2 * ratio, x) for _ in range(2)], 1)
    return _affine(x, theta)


def _cutout(x, g, ratio=0.5):
    n, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    cy = (torch.rand(n, generator=g) * h).long().to(x.device)
    cx = (torch.rand(n, generator=g) * w).long().to(x.device)
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    inside = ((rows - cy.view(n, 1, 1)).abs() < ch // 2 + 1) & ((cols - cx.view(n, 1, 1)).abs() < cw // 2 + 1)
    return x * (~inside).unsqueeze(1).to(x.dtype)


def _flip(x, g):
    flip = (torch.rand(len(x), generator=g) < 0.5).to(x.device).view(-1, 1, 1, 1)
    return torch.where(flip, x.flip(3), x)


def _scale(x, g, ratio=1.2):
    n = len(x)
    theta = torch.zeros(n, 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0] = _uniform(n, g, 1 / ratio, ratio, x)
    theta[:, 1, 1] = _uniform(n, g, 1 / ratio, ratio, x)
    return _affine(x, theta)


def _rotate(x, g, degrees=15.0):
    n = len(x)
    angle = _uniform(n, g, -degrees, degrees, x) * math.pi / 180
    theta = torch.zeros(n, 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0], theta[:, 0, 1] = torch.cos(angle), -torch.sin(angle)
    theta[:, 1, 0], theta[:, 1, 1] = torch.sin(angle), torch.cos(angle)
    return _affine(x, theta)


_OPS = {"color": _color, "crop": _translation, "cutout": _cutout, "flip": _flip, "scale": _scale, "rotate": _rotate}


def check_strategy(strategy: str) -> list[str]:
    """The operations of a strategy ("color_crop": color, then crop); ValueError when it names none (an augmentation
    that augments nothing) or an unknown one."""
    ops = [op for op in strategy.strip().split("_") if op]
    if not ops:
        raise ValueError(f"no operation is named, so nothing would be augmented; join some of "
                         f"{', '.join(OPERATIONS)} with _ (e.g. {DEFAULT_STRATEGY})")
    unknown = [op for op in ops if op not in _OPS]
    if unknown:
        raise ValueError(f"unknown DSA operation(s) {unknown}; choose from {', '.join(OPERATIONS)}")
    return ops


def dsa_augment(x: torch.Tensor, strategy: str, seed: int) -> torch.Tensor:
    """Apply the strategy's operations in order, with parameters drawn from `seed` (replayable)."""
    generator = torch.Generator().manual_seed(seed)
    for op in check_strategy(strategy):
        x = _OPS[op](x, generator)
    return x
