"""Run any module as a function of one flat parameter vector (the "reparameterised" student).

Trajectory matching differentiates through several SGD steps taken on a student whose parameters
are plain tensors in an autograd graph. `ReparamModule(module)(x, flat_param=theta)` runs `module`
with its parameters replaced by views into `theta` (via `torch.func.functional_call`), so
`theta - lr * grad(loss, theta)` is itself a valid parameter vector and gradients flow back
through every step.

The flat layout is `module.parameters()` order of the trainable parameters (`requires_grad`), each
tensor flattened: exactly the layout of a buffer snapshot, so `flatten(snapshot)` is a valid `theta`.
Frozen parameters (a frozen backbone under LoRA adapters) are taken from the module itself. The same call also accepts the
parameters as a list (`params=split(theta)`, views into the vector): the unrolled matching loop
steps each parameter tensor on its own, which keeps its memory use at the level of a plain
per-parameter loop (one concatenated copy per step would fragment the CPU heap).

Non-parameter buffers (BatchNorm running statistics): every call runs on a scratch copy of the
module's buffers, so the unrolled student never changes the wrapped module's statistics. In train
mode BatchNorm normalises with batch statistics (what the student uses); in eval mode it uses the
module's running statistics, which only real training (experts, evaluation models) accumulates.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call


def flatten(tensors) -> torch.Tensor:
    """Concatenate tensors (e.g. one buffer snapshot) into one flat vector."""
    return torch.cat([t.reshape(-1) for t in tensors])


class ReparamModule(nn.Module):
    """Wraps `module`; call it as `wrapper(*inputs, flat_param=theta)`."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module
        named = [(name, p) for name, p in module.named_parameters() if p.requires_grad]  # frozen ones stay put
        self.param_names = [name for name, _ in named]
        self.param_shapes = [p.shape for _, p in named]
        self.param_numels = [p.numel() for _, p in named]
        self.num_params = sum(self.param_numels)

    def flat_param(self) -> torch.Tensor:
        """The module's current parameters as one detached flat vector."""
        return flatten([p.detach() for p in self.module.parameters() if p.requires_grad]).clone()

    def unflatten(self, flat_param: torch.Tensor) -> dict[str, torch.Tensor]:
        if flat_param.dim() != 1 or flat_param.numel() != self.num_params:
            raise ValueError(f"flat_param must be a vector of {self.num_params} values, "
                             f"got shape {tuple(flat_param.shape)}")
        chunks = torch.split(flat_param, self.param_numels)
        return {name: chunk.view(shape) for name, chunk, shape in zip(self.param_names, chunks, self.param_shapes)}

    def split(self, flat_param: torch.Tensor) -> list[torch.Tensor]:
        """The flat vector as per-parameter views (snapshot layout)."""
        return list(self.unflatten(flat_param).values())

    def forward(self, *inputs, flat_param: torch.Tensor | None = None, params: list[torch.Tensor] | None = None):
        """Run with `flat_param` (one vector) or `params` (per-parameter tensors in the same order)."""
        named = self.unflatten(flat_param) if params is None else dict(zip(self.param_names, params))
        scratch_buffers = {name: b.clone() for name, b in self.module.named_buffers()}
        return functional_call(self.module, (named, scratch_buffers), inputs)
