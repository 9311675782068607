"""SparseGPT (Frantar & Alistarh, 2023): one-shot OBS pruning with adaptive block masks.

Steps: dead inputs (zero Hessian diagonal) get weight 0; ``U`` = upper Cholesky factor of
``(H + damp I)^-1`` (dampening escalated on failure); the OBS sweep over 128-column blocks picks
the mask per block from ``w^2 / U_jj^2`` (unstructured) or per group of M columns on the updated
weights (N:M), and compensates the remaining columns. With ``quant`` the kept weights are also
quantized inside the same sweep (joint sparsify + INT4).

``final_solve``: the greedy sweep leaves the kept weights close to, not at, the optimum of their
mask; this replaces them by the minimiser of the layer loss on the sweep's mask (ADMM's final
solve, ``admm.exact_solve``: conjugate gradients from the sweep's weights, with its default
dampening, ADMM's).
"""
import torch

from pyprune.ops.hessian import inverse_hessian_factor
from pyprune.ops.obs_sweep import QuantSpec, obs_sweep
from pyprune.solvers import admm
from pyprune.solvers.base import LayerStats, SolverResult, reconstruction_loss
from pyprune.solvers.pattern import SparsityPattern


def solve(
    W: torch.Tensor,
    stats: LayerStats,
    pattern: SparsityPattern,
    *,
    damp: float = 0.01,
    blocksize: int = 128,
    quant: QuantSpec = None,
    final_solve: bool = False,
    **_,
) -> SolverResult:
    if stats is None or stats.H is None:
        raise ValueError("sparsegpt needs calibration statistics (a Hessian)")
    if final_solve and quant is not None:
        raise ValueError("final_solve re-solves unquantized weights; it cannot follow the joint INT4 sweep")
    pattern.check_width(W.shape[1])
    factor = inverse_hessian_factor(stats.H, damp)
    W32 = W.float().clone()
    W32[:, factor.dead] = 0.0
    sweep = obs_sweep(
        W32,
        factor.U,
        sparsity=0.0 if pattern.is_nm else pattern.sparsity,
        nm=pattern.nm,
        quant=quant,
        blocksize=blocksize,
    )
    W_new = sweep.weight.to(W.dtype)
    final = {}
    if final_solve:
        W_new, solved = admm.exact_solve(W32, stats, sweep.pruned, method="cg", start=sweep.weight)
        W_new = W_new.to(W.dtype)
        final = {"final_solve": True, "final_iterations": solved["iterations"], "final_residual": solved["residual"]}
    info = {
        "obs_loss": sweep.loss,
        "damp": factor.damp_fraction,
        "cholesky_attempts": factor.attempts,
        "dead_inputs": int(factor.dead.sum()),
        **final,
    }
    if sweep.scales is not None:
        info["scales"] = sweep.scales
    return SolverResult(W_new, sweep.pruned, reconstruction_loss(W, W_new, stats.H), info)
