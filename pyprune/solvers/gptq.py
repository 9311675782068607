"""GPTQ (Frantar et al., 2022): INT4 with OBS error compensation, optionally around a fixed mask.

Steps: dead inputs (zero Hessian diagonal) get weight 0; ``U`` = upper Cholesky factor of
``(H + damp I)^-1``; the OBS sweep (``pyprune.ops.obs_sweep``) freezes columns left to right in
128-column lazy blocks, moving each to its grid point and spreading the error over the columns
not yet frozen. A group's scale is fitted when the sweep reaches the group's first column, on the
weights as updated so far.

``act_order``: columns are swept in order of decreasing Hessian diagonal (most active inputs
first). Groups stay *static*: every group is ``groupsize`` consecutive columns of the original
order and its scale is fitted before the sweep, so a group's scale is one contiguous run in the
stored layout (no ``g_idx`` indirection for kernels).

``pruned`` (bool, True = removed) makes it mask-preserving: pruned weights are set to exactly
zero when their column is frozen (their current value is error compensated like any other), and
scales are fitted on kept weights only, so all compensation ends up in kept weights and the mask
comes back bit-identical. ``refine_rounds`` > 0 then revisits every code and every group scale
(``pyprune.ops.int4_refine``: coordinate descent on the codes, least squares on the scales), which
never raises the layer loss. Its target is ``refine_target`` when given: the weight before pruning,
so that kept codes also take up the pruning error a greedy solver left (the layer objective
measures the error against that weight). ``scale_fit`` chooses how group scales are fitted
(``int4_grid.SCALE_FITS``; with act-order the static "mse" fit weighs each column by its Hessian
diagonal). ``W`` may hold the pruned solver's output (zeros at pruned positions,
e.g. ADMM) or the dense weights (then the pruning error is compensated in the same sweep).
"""
from typing import Optional

import torch

from pyprune.ops import int4_grid, int4_refine
from pyprune.ops.hessian import inverse_hessian_factor, no_tf32
from pyprune.ops.obs_sweep import QuantSpec, obs_sweep
from pyprune.solvers.base import LayerStats
from pyprune.solvers.quant_result import QuantResult, check_mask, make_result


def solve(
    W: torch.Tensor,
    stats: LayerStats,
    *,
    groupsize: int = 128,
    act_order: bool = False,
    pruned: Optional[torch.Tensor] = None,
    scale_fit: str = "minmax",
    refine_rounds: int = 0,
    refine_target: Optional[torch.Tensor] = None,
    damp: float = 0.01,
    blocksize: int = 128,
    **_,
) -> QuantResult:
    if stats is None or stats.H is None:
        raise ValueError("gptq needs calibration statistics (a Hessian); use method='rtn' without them")
    rows, cols = W.shape
    if tuple(stats.H.shape) != (cols, cols):
        raise ValueError(f"Hessian must be [{cols}, {cols}] for W of shape {tuple(W.shape)}, got {tuple(stats.H.shape)}")
    g = int4_grid.check_groupsize(groupsize, cols)
    int4_grid.check_scale_fit(scale_fit)
    int4_refine.check_rounds(refine_rounds)
    pruned = check_mask(pruned, W)
    if refine_target is not None and tuple(refine_target.shape) != tuple(W.shape):
        raise ValueError(f"refine_target must have W's shape {tuple(W.shape)}, got {tuple(refine_target.shape)}")
    with no_tf32():
        H = stats.H.float().to(W.device)
        W32 = W.float().clone()
        dead = torch.diag(H) == 0
        W32[:, dead] = 0.0
        if act_order:
            perm = torch.argsort(torch.diag(H), descending=True, stable=True)
            static = int4_grid.fit_group_scales(W32, g, pruned, scale_fit, column_weight=torch.diag(H))
            quant = QuantSpec(groupsize=g, static_scales=static, group_of_column=perm // g, scale_fit=scale_fit)
            H = H[perm][:, perm]
        else:
            perm = None
            quant = QuantSpec(groupsize=g, scale_fit=scale_fit)
        factor = inverse_hessian_factor(H, damp)
        sweep = obs_sweep(
            W32 if perm is None else W32[:, perm],
            factor.U,
            pruned=None if pruned is None else (pruned if perm is None else pruned[:, perm]),
            quant=quant,
            blocksize=blocksize,
        )
        weight, scales = sweep.weight, sweep.scales
        if perm is not None:
            inverse = torch.argsort(perm)
            weight = weight[:, inverse]
        refined = {}
        if refine_rounds:
            target = W32 if refine_target is None else refine_target.float().to(W.device)
            weight, scales, refined = int4_refine.refine_weight(target, weight, scales, g, stats.H,
                                                                factor.damp_fraction, pruned, refine_rounds)
    info = {
        "method": "gptq",
        "act_order": bool(act_order),
        "scale_fit": scale_fit,
        "obs_loss": sweep.loss,
        "damp": factor.damp_fraction,
        "cholesky_attempts": factor.attempts,
        "dead_inputs": int(dead.sum()),
        **refined,
    }
    if pruned is None:
        pruned = torch.zeros(rows, cols, dtype=torch.bool, device=W.device)
    return make_result(W, weight, scales, pruned, g, stats.H.to(W.device), info)
