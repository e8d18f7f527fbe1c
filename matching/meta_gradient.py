"""The meta-gradient of the matching loss, three ways (`distill.py --matching`).

Student step k maps θ_k to θ_{k+1} = θ_k − D g_k with g_k = ∇θ ℓ(θ_k; X) (the contrastive loss on
step k's minibatch of the learned tensors X) and D = diag(lr_img on image-encoder entries, lr_txt on
text-head entries). The matching loss L depends on θ_N only.

- `unroll` (the reference): one autograd graph through all N steps, kept until the backward pass.
  Memory grows linearly with N.
- `exact_lowmem`: the same gradient by a reverse sweep. The forward pass builds no graph and keeps
  the random state of every step and θ_k of every c-th step only (c = ⌈√N⌉). The sweep goes back
  one block of c steps at a time: it recomputes the block's θ_k from its checkpoint (plain steps,
  each replaying its recorded random state), then from a = ∂L/∂θ_N rebuilds step k = N−1 … 0 on
  its own, with the graph of g_k kept (`create_graph=True`); one backward pass of g_k · (D a) gives
  both H_k D a and (∂g_k/∂X)ᵀ D a; then
      ∂L/∂X   −= (∂g_k/∂X)ᵀ D a,     ∂L/∂lr_part −= g_k,part · a_part,     a −= H_k D a.
  Memory holds one step's graph at a time plus about 2√N parameter vectors (the checkpoints and one
  block); the price is one more plain student step per step in the sweep, except for the
  checkpointed steps and the last block, whose θ_k the forward pass keeps.
- `tesla`: the approximation of TESLA (Cui et al., ICML 2023) and LoRS: the same sweep with a held
  at ∂L/∂θ_N (no Hessian term). Exact for one step, biased for more.

Everything random inside a step (dropout in the text head; augmentation and minibatches are
already fixed by their seeds and indices) replays identically: the sweep restores the global RNG
state recorded before step k, both when it recomputes θ_{k+1} and when it rebuilds step k, and
afterwards leaves the RNG where the forward pass left it (as `unroll` does).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from matching.trajectory import Segment, StepLoss, Students, unroll
from settings.choices import MATCHING_MODES
from utils.rng import device_rng_state, set_device_rng_state



@dataclass
class MetaGradient:
    """The matching loss's two terms (detached) and its gradient w.r.t. every learned tensor and both step sizes."""

    image_term: torch.Tensor
    text_term: torch.Tensor
    learned_grads: list[torch.Tensor]
    lr_img_grad: torch.Tensor
    lr_txt_grad: torch.Tensor
    parameters_held: int = 0  # the reverse sweep's most θ_k (image and text parameter vectors) kept at once


def matching_gradients(mode: str, students: Students, step_loss: StepLoss, num_steps: int,
                       learned: Sequence[torch.Tensor], syn_lr_img: torch.Tensor, syn_lr_txt: torch.Tensor,
                       segment: Segment) -> MetaGradient:
    """The matching loss of `num_steps` student steps from `segment`'s start, and its meta-gradient."""
    if mode == "unroll":
        return _unrolled(students, step_loss, num_steps, learned, syn_lr_img, syn_lr_txt, segment)
    if mode in ("exact_lowmem", "tesla"):
        return _reverse_sweep(mode == "exact_lowmem", students, step_loss, num_steps, learned, syn_lr_img,
                              syn_lr_txt, segment)
    raise ValueError(f"unknown matching mode {mode!r}; choose from {', '.join(MATCHING_MODES)}")


def _unrolled(students, step_loss, num_steps, learned, syn_lr_img, syn_lr_txt, segment) -> MetaGradient:
    loss = unroll(students, step_loss, num_steps, learned, syn_lr_img, syn_lr_txt, segment)
    inputs = [*learned, syn_lr_img, syn_lr_txt]
    grads = torch.autograd.grad(loss.total, inputs, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip(inputs, grads)]
    return MetaGradient(loss.image_term.detach(), loss.text_term.detach(), grads[:-2], grads[-2], grads[-1])


def _term_and_adjoint(final: torch.Tensor, start: torch.Tensor, target: torch.Tensor):
    """‖final − target‖² / ‖start − target‖² and its gradient w.r.t. `final`."""
    denominator = (start - target).pow(2).sum()
    difference = final - target
    return difference.pow(2).sum() / denominator, 2 * difference / denominator


def checkpoint_interval(num_steps: int) -> int:
    """c = ⌈√N⌉: the sweep keeps θ_k for every c-th step and recomputes the others one block of c at a time."""
    return max(1, math.ceil(math.sqrt(num_steps)))


def _plain_step(students: Students, step_loss: StepLoss, step: int, theta_img, theta_txt, frozen, lr_img, lr_txt):
    """θ_{k+1} = θ_k − D g_k, without a graph."""
    leaf_img, leaf_txt = theta_img.clone().requires_grad_(True), theta_txt.clone().requires_grad_(True)
    loss = step_loss(step, students.image.split(leaf_img), students.text.split(leaf_txt), frozen)
    grad_img, grad_txt = torch.autograd.grad(loss, (leaf_img, leaf_txt))
    return theta_img - lr_img * grad_img, theta_txt - lr_txt * grad_txt


def _reverse_sweep(exact: bool, students: Students, step_loss: StepLoss, num_steps: int,
                   learned: Sequence[torch.Tensor], syn_lr_img: torch.Tensor, syn_lr_txt: torch.Tensor,
                   segment: Segment) -> MetaGradient:
    device = segment.start_img.device
    lr_img, lr_txt = syn_lr_img.detach(), syn_lr_txt.detach()
    frozen = [t.detach() for t in learned]
    interval = checkpoint_interval(num_steps)
    last_block = (num_steps - 1) // interval * interval

    # Forward: plain SGD steps, keeping the random state before every step, θ_k before every c-th
    # step, and every θ_k of the last block (the sweep starts there).
    stored, states = {}, []  # step k -> θ_k
    theta_img, theta_txt = segment.start_img.detach(), segment.start_txt.detach()
    for step in range(num_steps):
        if step % interval == 0 or step > last_block:
            stored[step] = (theta_img, theta_txt)
        states.append(device_rng_state(device))
        theta_img, theta_txt = _plain_step(students, step_loss, step, theta_img, theta_txt, frozen, lr_img, lr_txt)
    image_term, adjoint_img = _term_and_adjoint(theta_img, segment.start_img, segment.target_img)
    text_term, adjoint_txt = _term_and_adjoint(theta_txt, segment.start_txt, segment.target_txt)
    del theta_img, theta_txt

    # Reverse sweep, one block of c steps at a time, last block first: recompute the block's missing
    # θ_k from its checkpoint, then rebuild its steps one at a time, last first.
    learned_grads = [torch.zeros_like(t) for t in learned]
    lr_img_grad, lr_txt_grad = torch.zeros_like(lr_img), torch.zeros_like(lr_txt)
    most_held = 0
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], device_type=device.type):
        for first in reversed(range(0, num_steps, interval)):
            end = min(first + interval, num_steps)
            for step in range(first + 1, end):
                if step not in stored:  # θ_step = step `step − 1` applied to θ_{step−1}, its randomness replayed
                    set_device_rng_state(states[step - 1], device)
                    stored[step] = _plain_step(students, step_loss, step - 1, *stored[step - 1], frozen, lr_img,
                                               lr_txt)
            most_held = max(most_held, len(stored))
            for step in reversed(range(first, end)):
                theta_img, theta_txt = stored.pop(step)
                set_device_rng_state(states[step], device)
                leaf_img, leaf_txt = theta_img.requires_grad_(True), theta_txt.requires_grad_(True)
                leaves = [t.detach().requires_grad_(True) for t in learned]
                loss = step_loss(step, students.image.split(leaf_img), students.text.split(leaf_txt), leaves)
                grad_img, grad_txt = torch.autograd.grad(loss, (leaf_img, leaf_txt), create_graph=True)
                lr_img_grad -= grad_img.detach() @ adjoint_img
                lr_txt_grad -= grad_txt.detach() @ adjoint_txt
                directional = grad_img @ (lr_img * adjoint_img) + grad_txt @ (lr_txt * adjoint_txt)
                inputs = leaves + ([leaf_img, leaf_txt] if exact else [])
                second = torch.autograd.grad(directional, inputs, allow_unused=True)
                for total, part in zip(learned_grads, second[:len(leaves)]):
                    if part is not None:
                        total -= part
                if exact:  # a_k = a_{k+1} − H_k D a_{k+1}
                    hvp_img, hvp_txt = second[len(leaves):]
                    adjoint_img = adjoint_img if hvp_img is None else adjoint_img - hvp_img
                    adjoint_txt = adjoint_txt if hvp_txt is None else adjoint_txt - hvp_txt
                del loss, grad_img, grad_txt, directional, second, theta_img, theta_txt, leaf_img, leaf_txt
    return MetaGradient(image_term, text_term, learned_grads, lr_img_grad, lr_txt_grad, most_held)
