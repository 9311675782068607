"""Wanda (Sun et al., 2023): score |w_ij| * ||x_j||_2, compared within each output row."""
import torch

from pyprune.ops.selection import CHUNK_ELEMENTS
from pyprune.solvers.base import LayerStats, SolverResult, reconstruction_loss
from pyprune.solvers.pattern import SparsityPattern, select_pruned


def scores(W: torch.Tensor, stats: LayerStats) -> torch.Tensor:
    return scores_with_norms(W, stats.input_norms())


def scores_with_norms(W: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    score = W.abs().float()
    return score.mul_(norms.reshape(1, -1).to(score.device))  # in place: one float32 copy of W


def solve(W: torch.Tensor, stats: LayerStats, pattern: SparsityPattern, **_) -> SolverResult:
    # The selection is row-local (per row or per N:M group), so the float32 scores are made one
    # block of rows at a time instead of for the whole matrix.
    norms = stats.input_norms()
    pruned = torch.empty(W.shape, dtype=torch.bool, device=W.device)
    step = max(1, CHUNK_ELEMENTS // max(W.shape[1], 1))
    for start in range(0, W.shape[0], step):
        pruned[start:start + step] = select_pruned(scores_with_norms(W[start:start + step], norms), pattern,
                                                   per_row=True)
    W_new = W.masked_fill(pruned, 0)
    return SolverResult(W_new, pruned, reconstruction_loss(W, W_new, stats.H))
