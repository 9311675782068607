"""Round-to-nearest INT4: the baseline every other quantizer must beat.

Each group's scale is fitted (min-max, or the unweighted mse search) on its kept weights, every
weight goes to its nearest grid point, pruned weights to code 0. Needs no calibration data;
``stats`` only serves the loss.
"""
from typing import Optional

import torch

from pyprune.ops import int4_grid
from pyprune.solvers.base import LayerStats
from pyprune.solvers.quant_result import QuantResult, check_mask, make_result


def solve(
    W: torch.Tensor,
    stats: Optional[LayerStats] = None,
    *,
    groupsize: int = 128,
    pruned: Optional[torch.Tensor] = None,
    scale_fit: str = "minmax",
    **_,
) -> QuantResult:
    g = int4_grid.check_groupsize(groupsize, W.shape[1])
    pruned = check_mask(pruned, W)
    W32 = W.float()
    if pruned is not None:
        W32 = W32.masked_fill(pruned, 0.0)
    scales = int4_grid.fit_group_scales(W32, g, scale_fit=scale_fit)
    weight = int4_grid.dequantize_groups(int4_grid.quantize_groups(W32, scales, g), scales, g)
    if pruned is None:
        pruned = torch.zeros_like(weight, dtype=torch.bool)
    H = stats.H if stats is not None else None
    return make_result(W, weight, scales, pruned, g, H, {"method": "rtn", "scale_fit": scale_fit})
