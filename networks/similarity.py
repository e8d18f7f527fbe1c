"""A learned target similarity between the N synthetic images and N synthetic texts (LoRS, Xu et al., ICML 2024).

The paper's method trains every pair against the identity: image i matches text i and nothing
else. LoRS learns the target matrix S alongside the pixels and text embeddings:

- `none`: S = I, nothing learned (the paper's method).
- `full`: S itself is learned, initialised to I.
- `lowrank`: S = diag(a) + (α / r) · L Rᵀ with a ∈ ℝᴺ (ones), L ∈ ℝᴺˣʳ (standard normal) and
  R ∈ ℝᴺˣʳ (zeros), so S starts as I and its low-rank part grows from zero.

A student step on minibatch `idx` uses the sub-matrix S[idx, idx]; for `lowrank` it is built from
the rows `idx` of a, L and R without forming the N×N matrix.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from settings.choices import SIM_TYPES
from utils.errors import SettingError



class TargetSimilarity:
    """The parameterisation of S; the learned tensors themselves are passed in (they are the optimiser's)."""

    def __init__(self, sim_type: str, size: int, rank: int = 10, alpha: float = 1.0):
        if sim_type not in SIM_TYPES:
            raise SettingError("sim_type", sim_type,
                               f"unknown similarity type {sim_type!r}; choose from {', '.join(SIM_TYPES)}")
        if sim_type == "lowrank" and rank < 1:
            raise SettingError("sim_rank", rank, f"the low-rank similarity needs a rank of at least 1, got {rank}")
        self.sim_type, self.size, self.rank, self.alpha = sim_type, size, rank, alpha

    def initial_params(self, generator: torch.Generator, device: torch.device,
                       dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
        """Fresh learnable tensors that make S the identity: [] / [S] / [a, L, R]."""
        if self.sim_type == "none":
            return []
        if self.sim_type == "full":
            return [torch.eye(self.size, dtype=dtype).to(device)]
        left = torch.randn(self.size, self.rank, generator=generator, dtype=dtype)
        return [torch.ones(self.size, dtype=dtype).to(device), left.to(device),
                torch.zeros(self.size, self.rank, dtype=dtype).to(device)]

    def submatrix(self, params: Sequence[torch.Tensor], indices: torch.Tensor | None = None) -> torch.Tensor | None:
        """S[indices, indices] (all of S when `indices` is None); None for `none` (identity targets)."""
        if self.sim_type == "none":
            return None
        if self.sim_type == "full":
            (matrix,) = params
            return matrix if indices is None else matrix[indices][:, indices]
        diagonal, left, right = params
        if indices is not None:
            diagonal, left, right = diagonal[indices], left[indices], right[indices]
        return torch.diag(diagonal) + (self.alpha / self.rank) * left @ right.t()
