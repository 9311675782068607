"""Magnitude pruning: remove the smallest |w| of the whole layer (or of each N:M group)."""
import torch

from pyprune.solvers.base import LayerStats, SolverResult, reconstruction_loss
from pyprune.solvers.pattern import SparsityPattern, select_pruned


def solve(W: torch.Tensor, stats: LayerStats, pattern: SparsityPattern, **_) -> SolverResult:
    pruned = select_pruned(W.abs(), pattern, per_row=False)  # compared as float32, chunk by chunk
    W_new = W.masked_fill(pruned, 0)
    return SolverResult(W_new, pruned, reconstruction_loss(W, W_new, stats.H if stats else None))
