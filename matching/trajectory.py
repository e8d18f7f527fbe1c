"""The trajectory-matching objective (docs/method.md), unrolled through the student's SGD steps."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from networks.contrastive import contrastive_loss
from networks.similarity import TargetSimilarity
from reparam_module import ReparamModule, flatten


@dataclass
class Students:
    """The functional models the student steps run through: the trainable image part (the image
    encoder, or its LoRA adapters, or with a frozen encoder the image projection head) and the text head."""

    image: ReparamModule
    text: ReparamModule
    frozen_encoder: torch.nn.Module | None = None  # set when `image` is a head over a frozen encoder


# step_loss(step, params_img, params_txt, learned) -> the loss of student step `step`, run with the
# given per-parameter tensors on the learned tensors (synthetic images, texts, ...).
StepLoss = Callable[[int, list[torch.Tensor], list[torch.Tensor], Sequence[torch.Tensor]], torch.Tensor]


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


TRUNK_CHUNK = 128  # images per pass of a frozen encoder over the synthetic set, when more are used


class FrozenPass:
    """A frozen encoder's outputs for the synthetic `pixels` [N, ...] and, later, the gradient they send back to the
    learned pixels. Only the images that the student steps' minibatches `batches` hold are encoded; the rows of the
    others are zero (no step reads them, so they get no gradient either way). The encoder is in eval mode, so an
    image's output does not depend on the others in its pass: at sets far larger than the images one iteration
    uses, the cost follows the images used. Up to `chunk` images go through in one pass whose graph is kept; more
    are encoded `chunk` at a time without a graph and encoded again, a chunk at a time, for the backward pass
    (one more forward pass, in exchange for memory that does not grow with the set; EfficientNet-Lite0 at
    128 px on the 2-core CPU, forward and backward of 450 images: 8.6 s in chunks of 128, 9.8-11.9 s in one pass)."""

    def __init__(self, encoder: torch.nn.Module, pixels: torch.Tensor, batches: list[torch.Tensor],
                 chunk: int = TRUNK_CHUNK):
        self.encoder, self.pixels, self.chunk = encoder, pixels, chunk
        self.used = torch.unique(torch.cat(batches)).to(pixels.device)
        self.graph = None
        if len(self.used) <= chunk:
            self.graph = encoder(pixels) if len(self.used) == len(pixels) else self._scatter(encoder(pixels[self.used]))
            self.features = self.graph.detach()
        else:
            with torch.no_grad():
                self.features = self._scatter(torch.cat([encoder(pixels[part]) for part in self.used.split(chunk)]))

    def _scatter(self, seen: torch.Tensor) -> torch.Tensor:
        return seen.new_zeros((len(self.pixels), *seen.shape[1:])).index_copy(0, self.used, seen)

    def pixel_gradient(self, leaf: torch.Tensor, feature_grad: torch.Tensor) -> torch.Tensor:
        """The gradient w.r.t. `leaf` (the learned pixels the `pixels` came from) of features · `feature_grad`."""
        if self.graph is not None:
            return torch.autograd.grad(self.graph, leaf, feature_grad)[0]
        total = torch.zeros_like(leaf)
        for part in self.used.split(self.chunk):
            (grad,) = torch.autograd.grad(self.encoder(self.pixels[part]), leaf, feature_grad[part], retain_graph=True)
            total += grad
        return total


def draw_blends(syn_steps: int, mini_batch_size: int, alpha: float,
                generator: torch.Generator) -> list[tuple[float, torch.Tensor]]:
    """RepBlend: per student step, λ ~ Beta(alpha, alpha) and a permutation of the minibatch."""
    blends = []
    for _ in range(syn_steps):
        seed = int(torch.randint(0, 2**63 - 1, (1,), generator=generator))
        blends.append((float(np.random.default_rng(seed).beta(alpha, alpha)),
                       torch.randperm(mini_batch_size, generator=generator)))
    return blends


def blend(images: torch.Tensor, texts: torch.Tensor, mix: tuple[float, torch.Tensor]):
    """x ← λx + (1−λ)x[perm] and y ← λy + (1−λ)y[perm], one λ and one permutation for both modalities."""
    lam, perm = mix
    perm = perm.to(images.device)
    return lam * images + (1 - lam) * images[perm], lam * texts + (1 - lam) * texts[perm]


def student_step_loss(students: Students, images: torch.Tensor, texts: torch.Tensor,
                      params_img: list[torch.Tensor], params_txt: list[torch.Tensor],
                      augment: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
                      step: int = 0, targets: torch.Tensor | None = None, loss_type: str = "infonce",
                      mix: tuple[float, torch.Tensor] | None = None, features_given: bool = False) -> torch.Tensor:
    """Contrastive loss of student step `step` on a minibatch of synthetic pairs.

    Images go through the image encoder (the student's, or the frozen one), then with `mix` are
    blended with the texts (after the encoders, before the heads), then through the image head when
    there is one. `features_given`: `images` are already the frozen encoder's features.
    `augment(images, step)`, if given, must be deterministic in `step` (see utils/dsa.py).
    """
    if not features_given:
        if augment is not None:
            images = augment(images, step)
        if students.frozen_encoder is not None:
            images = students.frozen_encoder(images)
        else:
            images = students.image(images, params=params_img)
    if mix is not None:
        images, texts = blend(images, texts, mix)
    image_features = students.image(images, params=params_img) if students.frozen_encoder is not None else images
    text_features = students.text(texts, params=params_txt)
    return contrastive_loss(image_features, text_features, targets, loss_type)


def sgd_update(theta: torch.Tensor, grad: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
    """theta - lr * grad in one fused op (no temporary lr * grad vector), differentiable in all three."""
    return torch.addcmul(theta, grad, lr, value=-1)


@dataclass
class MatchingLoss:
    total: torch.Tensor
    image_term: torch.Tensor
    text_term: torch.Tensor


def normalised_distance(final: list[torch.Tensor], start: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """||final - target||² / ||start - target||², `final` given per parameter (no concatenated copy)."""
    targets = torch.split(target, [p.numel() for p in final])
    moved = sum((p.reshape(-1) - t).pow(2).sum() for p, t in zip(final, targets))
    return moved / (start - target).pow(2).sum()


def contrastive_step_loss(students: Students, batches: list[torch.Tensor],
                          augment: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
                          similarity: TargetSimilarity | None = None, loss_type: str = "infonce",
                          blends: list[tuple[float, torch.Tensor]] | None = None,
                          features_given: bool = False) -> StepLoss:
    """The student step: the contrastive loss on minibatch `batches[step]` of the learned tensors
    (images or their frozen-encoder features, texts, then the similarity's parameters), against
    S[idx, idx] when a similarity is learned, with the step's blend when given."""
    def step_loss(step: int, params_img: list[torch.Tensor], params_txt: list[torch.Tensor],
                  learned: Sequence[torch.Tensor]) -> torch.Tensor:
        images, texts, *sim_params = learned
        indices = batches[step].to(images.device)
        targets = similarity.submatrix(sim_params, indices) if similarity is not None else None
        return student_step_loss(students, images[indices], texts[indices], params_img, params_txt, augment, step,
                                 targets, loss_type, blends[step] if blends else None, features_given)
    return step_loss


def unroll(students: Students, step_loss: StepLoss, num_steps: int, learned: Sequence[torch.Tensor],
           syn_lr_img: torch.Tensor, syn_lr_txt: torch.Tensor, segment: Segment) -> MatchingLoss:
    """Unroll `num_steps` student steps from the segment's start, keeping the whole graph.

    Image and text parameters step in parallel, each with its own learnable step size; the
    returned loss is differentiable w.r.t. the learned tensors and both step sizes.
    """
    params_img = [p.requires_grad_(True) for p in students.image.split(segment.start_img.clone())]
    params_txt = [p.requires_grad_(True) for p in students.text.split(segment.start_txt.clone())]
    for step in range(num_steps):
        loss = step_loss(step, params_img, params_txt, learned)
        grads = torch.autograd.grad(loss, params_img + params_txt, create_graph=True)
        params_img = [sgd_update(p, g, syn_lr_img) for p, g in zip(params_img, grads[:len(params_img)])]
        params_txt = [sgd_update(p, g, syn_lr_txt) for p, g in zip(params_txt, grads[len(params_img):])]
    image_term = normalised_distance(params_img, segment.start_img, segment.target_img)
    text_term = normalised_distance(params_txt, segment.start_txt, segment.target_txt)
    return MatchingLoss(image_term + text_term, image_term, text_term)


def unrolled_matching_loss(students: Students, image_syn: torch.Tensor, text_syn: torch.Tensor,
                           syn_lr_img: torch.Tensor, syn_lr_txt: torch.Tensor, segment: Segment,
                           batches: list[torch.Tensor],
                           augment: Callable[[torch.Tensor, int], torch.Tensor] | None = None) -> MatchingLoss:
    """The paper's objective: one student step per minibatch of (images, texts), the whole graph kept."""
    return unroll(students, contrastive_step_loss(students, batches, augment), len(batches), (image_syn, text_syn),
                  syn_lr_img, syn_lr_txt, segment)
