"""What every solver takes and returns.

A solver is a pure function ``solve(W, stats, pattern, **options) -> SolverResult`` on one weight
matrix ``W`` of shape ``[out_features, in_features]``. No hooks, no models, no I/O.
"""
from dataclasses import dataclass, field
from typing import Optional

import torch

from pyprune.ops.hessian import no_tf32


@dataclass
class LayerStats:
    """Calibration statistics of one Linear's input.

    ``H``: ``(2/n) * sum x x^T`` in float32, ``[in, in]`` (see ``pyprune.ops.hessian``).
    ``nsamples``: number of input rows (tokens) folded into ``H``.
    ``diagonal``: ``(2/n) * sum x_j^2`` ``[in]``, the diagonal of ``H``, for solvers that need only
    that (wanda) when the full ``H`` was not collected.
    ``cross``: ``(2/n) * sum x~ x^T`` ``[in, in]``, ``x~`` the same Linear's input in a teacher
    model on the same tokens (``pyprune.ops.teacher``); None outside teacher calibration.
    """

    H: Optional[torch.Tensor] = None
    nsamples: int = 0
    diagonal: Optional[torch.Tensor] = None
    cross: Optional[torch.Tensor] = None

    def input_norms(self) -> torch.Tensor:
        """Per input column ``||x_j||_2`` up to one common factor (all a row-wise ranking needs)."""
        if self.H is not None:
            return torch.diag(self.H).clamp_min(0).sqrt()
        if self.diagonal is not None:
            return self.diagonal.clamp_min(0).sqrt()
        raise ValueError("this solver needs calibration statistics (a Hessian), none were given")


@dataclass
class SolverResult:
    weight: torch.Tensor  # same dtype and device as the input W
    pruned: torch.Tensor  # bool, True where the weight was removed
    loss: float  # 0.5 * tr(dW H dW^T) (mean per-token squared error); nan without a Hessian
    info: dict = field(default_factory=dict)


def reconstruction_loss(W: torch.Tensor, W_new: torch.Tensor, H: Optional[torch.Tensor]) -> float:
    """``0.5 * tr(dW H dW^T)``: mean over calibration tokens of ``||(W - W_new) x||^2``."""
    if H is None:
        return float("nan")
    dW = (W.float() - W_new.float())
    return float(0.5 * torch.sum(dW.matmul(H.float()) * dW))


def output_energy(W: torch.Tensor, H: torch.Tensor) -> float:
    """``0.5 * tr(W H W^T)``: the mean per-token ``||W x||^2``, on the scale of the losses, so
    ``loss / output_energy`` is the fraction of the Linear's output the pruning destroys."""
    with no_tf32():
        W = W.float().to(H.device)
        return float(0.5 * torch.sum(W.matmul(H.float()) * W))
