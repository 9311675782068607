"""Wanda (Sun et al., 2023): score |w_ij| * ||x_j||_2, compared within each output row."""
import torch

from pyprune.solvers.base import LayerStats, SolverResult, reconstruction_loss
from pyprune.solvers.pattern import SparsityPattern, select_pruned


def scores(W: torch.Tensor, stats: LayerStats) -> torch.Tensor:
    return W.abs().float() * stats.input_norms().reshape(1, -1)


def solve(W: torch.Tensor, stats: LayerStats, pattern: SparsityPattern, **_) -> SolverResult:
    pruned = select_pruned(scores(W, stats), pattern, per_row=True)
    W_new = W.masked_fill(pruned, 0)
    return SolverResult(W_new, pruned, reconstruction_loss(W, W_new, stats.H))
