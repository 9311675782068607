"""Pruning-loss estimates from the inverse Hessian, without pruning.

Removing weight ``w_j`` of a row with the optimal (OBS) update of the others costs
``w_j^2 / (2 [H^-1]_jj)`` under the loss ``0.5 * tr(dW H dW^T)`` every solver reports.
SparseGPT prunes the columns left to right; once columns ``< j`` are frozen, the inverse Hessian
of the reduced problem has ``U_jj^2`` on its diagonal, where ``U`` is the upper Cholesky factor
of ``(H + damp I)^-1`` ("sequentially pruning all": the rows of ``U`` are the inverse Hessians of
the successively reduced problems, so one factorisation serves every column). The estimate of a
layer at sparsity ``s`` is therefore

    E(s) = 0.5 * sum over the weights that would be removed of  w_ij^2 / U_jj^2,

with the removed weights chosen as SparseGPT chooses them (the ``round(s * numel)`` smallest
scores ``w^2 / U_jj^2`` of each block of ``blocksize`` columns). It uses the original weights,
i.e. ignores the compensation earlier columns add, so it is an estimate, not the solver's loss.
Every Hessian has the same normalisation ``(2/n) sum x x^T``, so estimates of different Linears
and decoder layers are on one scale (mean per-token squared output error).

Dampening. ``U`` belongs to ``H + delta I`` (``delta = damp * mean(diag H)``), and the loss of
``H + delta I`` contains ``delta/2 * ||dW||^2``, a weight-decay term that is no part of the real
output error. In layers with a few huge input features (massive activations) ``delta`` is large
next to most inputs' variance and that term dominates (on SmolLM2-135M it inflates the damped
loss of some layers 2-4.5x while the others stay within 10 %). With ``undamped=True`` (default)
each removed weight costs ``w^2 (1/U_jj^2 - delta) / 2`` instead: same mask, same ``U``, minus the
removed weight's own share of the damping term (``dW_j = w_j``, so this is exact for a diagonal
Hessian and never negative, because ``1/[(H + delta I)^-1]_jj >= delta``).
"""
from typing import Dict, Iterable, Optional, Sequence

import torch

from pyprune.ops.hessian import inverse_hessian_factor, no_tf32
from pyprune.solvers.base import LayerStats


def obs_scores(W: torch.Tensor, U: torch.Tensor, dead: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-weight OBS saliency ``w_ij^2 / U_jj^2`` (float32); dead inputs score 0 (free to drop)."""
    W = W.float()
    if dead is not None and dead.any():
        W = W.clone()
        W[:, dead] = 0.0
    return W.pow(2) / torch.diag(U).float().reshape(1, -1).pow(2)


def obs_error_curve(scores: torch.Tensor, sparsities: Sequence[float], blocksize: int = 128,
                    costs: Optional[torch.Tensor] = None) -> list:
    """``E(s)`` for each ``s`` in ``sparsities`` from the score matrix ``[rows, cols]``.

    The weights removed are the lowest ``scores`` of each block; each costs its entry of ``costs``
    (default: its score). Each block is sorted once; a prefix sum then gives any sparsity.
    """
    if blocksize < 1:
        raise ValueError(f"blocksize={blocksize}: must be at least 1")
    for s in sparsities:
        if not 0.0 <= float(s) < 1.0:
            raise ValueError(f"candidate sparsity {s} is outside [0, 1)")
    totals = [0.0] * len(sparsities)
    cols = scores.shape[1]
    for i1 in range(0, cols, blocksize):
        block = scores[:, i1:i1 + blocksize].flatten()
        order = torch.argsort(block)
        block_costs = block if costs is None else costs[:, i1:i1 + blocksize].flatten()
        prefix = torch.cumsum(block_costs[order].double(), 0)
        for t, s in enumerate(sparsities):
            k = int(round(block.numel() * float(s)))
            if k:
                totals[t] += float(prefix[k - 1])
    return [0.5 * t for t in totals]


def undamped_costs(W: torch.Tensor, scores: torch.Tensor, H: torch.Tensor, damp_fraction: float,
                   dead: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``w^2 (1/U_jj^2 - delta)``: the scores less the removed weight's share of the damping term."""
    diag = torch.diag(H).float().clone()
    diag[diag == 0] = 1.0  # dead inputs count as the factorisation counts them
    delta = damp_fraction * float(diag.mean())
    W = W.float()
    if dead is not None and dead.any():
        W = W.clone()
        W[:, dead] = 0.0
    return (scores - delta * W.pow(2)).clamp_min(0.0)


def obs_error(W: torch.Tensor, stats: LayerStats, sparsity: float, damp: float = 0.01,
              blocksize: int = 128, undamped: bool = True) -> float:
    """Estimated pruning loss of one Linear at ``sparsity`` (see the module docstring)."""
    return estimate_linears({"w": W}, {"w": stats}, [sparsity], damp, blocksize, undamped)["w"][0]


def estimate_linears(weights_by_name: Dict[str, torch.Tensor], stats_by_name: Dict[str, LayerStats],
                     sparsities: Iterable[float], damp: float = 0.01, blocksize: int = 128,
                     undamped: bool = True) -> Dict[str, list]:
    """Estimates ``{name: [E(s) for s in sparsities]}`` for the Linears of one decoder layer."""
    both = estimate_linears_both(weights_by_name, stats_by_name, sparsities, damp, blocksize, undamped, not undamped)
    return both[0] if undamped else both[1]


def estimate_linears_both(weights_by_name, stats_by_name, sparsities, damp: float = 0.01, blocksize: int = 128,
                          undamped: bool = True, damped: bool = True):
    """``(undamped, damped)`` estimate dicts (an unrequested one is ``{}``), one factorisation each.

    Linears reading the same input (q/k/v, gate/up) have equal Hessians; their factor is computed
    once (an equality check is O(d^2), the factorisation O(d^3)).
    """
    sparsities = list(sparsities)
    out_undamped, out_damped, factors = {}, {}, []  # factors: [(H, HessianFactor)] of this layer so far
    with no_tf32():
        for name, W in weights_by_name.items():
            stats = stats_by_name.get(name)
            if stats is None or stats.H is None:
                raise ValueError(f"the error estimate of {name!r} needs its Hessian; none was collected")
            if stats.H.shape != (W.shape[1], W.shape[1]):
                raise ValueError(f"Hessian of {name!r} is {tuple(stats.H.shape)} for a weight of shape {tuple(W.shape)}")
            factor = next((f for H, f in factors if H.shape == stats.H.shape and torch.equal(H, stats.H)), None)
            if factor is None:
                factor = inverse_hessian_factor(stats.H, damp)
                factors.append((stats.H, factor))
            W32 = W.to(device=factor.U.device, dtype=torch.float32)
            scores = obs_scores(W32, factor.U, factor.dead)
            if undamped:
                costs = undamped_costs(W32, scores, stats.H.to(W32.device), factor.damp_fraction, factor.dead)
                out_undamped[name] = obs_error_curve(scores, sparsities, blocksize, costs)
            if damped:
                out_damped[name] = obs_error_curve(scores, sparsities, blocksize)
    return out_undamped, out_damped
