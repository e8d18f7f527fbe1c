"""The trajectory-matching objective of SPEC §2 (steps 2-4), unrolled through the student's SGD steps."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from networks.contrastive import contrastive_loss
from reparam_module import ReparamModule, flatten


@dataclass
class Students:
    """The functional image encoder and text projection head the student steps run through."""

    image: ReparamModule
    text: ReparamModule


@dataclass
class Segment:
    """One piece of an expert trajectory: start parameters and the target `expert_epochs` later."""

    start_img: torch.Tensor
    start_txt: torch.Tensor
    target_img: torch.Tensor
    target_txt: torch.Tensor
    start_epoch: int


def pick_segment(image_traj: list, text_traj: list, max_start_epoch: int, expert_epochs: int,
                 generator: torch.Generator, device: torch.device) -> Segment:
    """start ~ U{0, ..., max_start_epoch - 1} (the reference's numpy randint); flat start and target."""
    start = int(torch.randint(0, max_start_epoch, (1,), generator=generator))
    end = start + expert_epochs
    to_flat = lambda snapshot: flatten(snapshot).to(device)  # noqa: E731
    return Segment(to_flat(image_traj[start]), to_flat(text_traj[start]),
                   to_flat(image_traj[end]), to_flat(text_traj[end]), start)


def draw_minibatches(num_queries: int, mini_batch_size: int, syn_steps: int,
                     generator: torch.Generator) -> list[torch.Tensor]:
    """Each student step takes the first `mini_batch_size` of a fresh random permutation (as the reference)."""
    return [torch.randperm(num_queries, generator=generator)[:mini_batch_size] for _ in range(syn_steps)]


def student_step_loss(students: Students, images: torch.Tensor, texts: torch.Tensor,
                      theta_img: torch.Tensor, theta_txt: torch.Tensor,
                      augment: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
                      step: int = 0) -> torch.Tensor:
    """Contrastive loss of student step `step` on a minibatch of synthetic pairs.

    `augment(images, step)`, if given, must be deterministic in `step` (see utils/dsa.py).
    """
    if augment is not None:
        images = augment(images, step)
    image_features = students.image(images, flat_param=theta_img)
    text_features = students.text(texts, flat_param=theta_txt)
    return contrastive_loss(image_features, text_features)


@dataclass
class MatchingLoss:
    total: torch.Tensor
    image_term: torch.Tensor
    text_term: torch.Tensor


def normalised_distance(final: torch.Tensor, start: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """||final - target||² / ||start - target||²."""
    return (final - target).pow(2).sum() / (start - target).pow(2).sum()


def unrolled_matching_loss(students: Students, image_syn: torch.Tensor, text_syn: torch.Tensor,
                           syn_lr_img: torch.Tensor, syn_lr_txt: torch.Tensor, segment: Segment,
                           batches: list[torch.Tensor],
                           augment: Callable[[torch.Tensor, int], torch.Tensor] | None = None) -> MatchingLoss:
    """Unroll one student step per minibatch from the segment's start, keeping the whole graph.

    Image and text parameters step in parallel, each with its own learnable step size; the
    returned loss is differentiable w.r.t. the synthetic images, texts and both step sizes.
    """
    theta_img = segment.start_img.clone().requires_grad_(True)
    theta_txt = segment.start_txt.clone().requires_grad_(True)
    for step, indices in enumerate(batches):
        indices = indices.to(image_syn.device)
        loss = student_step_loss(students, image_syn[indices], text_syn[indices], theta_img, theta_txt,
                                 augment, step)
        grad_img, grad_txt = torch.autograd.grad(loss, (theta_img, theta_txt), create_graph=True)
        theta_img = theta_img - syn_lr_img * grad_img
        theta_txt = theta_txt - syn_lr_txt * grad_txt
    image_term = normalised_distance(theta_img, segment.start_img, segment.target_img)
    text_term = normalised_distance(theta_txt, segment.start_txt, segment.target_txt)
    return MatchingLoss(image_term + text_term, image_term, text_term)
