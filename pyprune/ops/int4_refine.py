"""Refinement of an INT4 solution on its own grid (after GPTQ or the joint SparseGPT sweep).

The objective is the layer loss ``tr((W - Q) H (W - Q)^T)`` with ``Q = scale * code`` and ``H``
the dampened Hessian the sweep used. Rows are independent in it, so every step below works on all
rows at once. Pruned weights stay exactly zero: their codes are never touched.

GPTQ visits each weight once, in column order, and fits a group's scale before it knows the codes
of the group. Each refinement round revisits both:

1. **Codes** (scales fixed): a pass over the columns. Weight ``j`` of a row moves to the grid
   point nearest its one-dimensional optimum given all the others, ``q_j - g_j / H_jj`` with ``g``
   the gradient ``(Q - W) H``. Along one coordinate the loss is a parabola, so that grid point is
   the best one and no step raises the loss. Columns are taken in 128-wide blocks: the gradient of
   the columns after a block is updated with one matrix product, as in the OBS sweep.
2. **Scales** (codes fixed): the loss is quadratic in a row's group scales, so their optimum is
   the solution of a ``ngroups x ngroups`` linear system. It is rounded to float16 (the stored
   format), and a row keeps its old scales unless the rounded ones lower its loss.

So the loss never increases from one round to the next, and the result is still exactly on the
grid of ``pyprune.ops.int4_grid``. The target ``W`` is the weight the quantizer was given: after a
pruning solver that is the pruned weight; in the joint SparseGPT sweep it is the dense weight, so
the kept weights also take up part of the pruning error that the greedy sweep left.
"""
from dataclasses import dataclass

import torch

from pyprune.ops import int4_grid
from pyprune.ops.hessian import fix_dead_columns, no_tf32

DEFAULT_ROUNDS = 4
_BLOCK = 128
_SCALE_SYSTEM_BYTES = 256 * 2 ** 20  # working memory of one chunk of rows in the scale solve


@dataclass
class RefinedCodes:
    codes: torch.Tensor  # int8 [rows, cols]
    scales: torch.Tensor  # float32 [rows, ngroups], fp16-exact
    loss_before: float  # tr(dW H dW^T) with the dampened H, before the first round
    loss_after: float


def check_rounds(rounds: int) -> int:
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
        raise ValueError(f"refine_rounds={rounds!r}: must be an integer >= 0 (0 = no refinement)")
    return rounds


def dampened(H: torch.Tensor, damp_fraction: float) -> torch.Tensor:
    """The objective the OBS sweep minimised (float32 copy): dead inputs given a unit diagonal as
    ``inverse_hessian_factor`` does, then ``+ damp * mean(diag H) * I``."""
    H = H.float().clone()
    fix_dead_columns(H)
    H.diagonal().add_(damp_fraction * float(H.diagonal().mean()))
    return H


def refine_weight(W: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, groupsize: int,
                  H: torch.Tensor, damp_fraction: float, pruned: torch.Tensor = None,
                  rounds: int = DEFAULT_ROUNDS):
    """A quantizer's on-grid float32 ``weight`` refined towards its target ``W`` on the raw
    Hessian ``H`` dampened as the sweep did; returns ``(weight, scales, info)``."""
    H = H.float().to(W.device)
    target = W.float().clone()
    target[:, H.diagonal() == 0] = 0.0  # dead inputs: the sweep zeroed them too
    codes = int4_grid.encode(weight, scales, groupsize)
    result = refine(target, codes, scales, groupsize, dampened(H, damp_fraction), pruned, rounds)
    refined = int4_grid.dequantize_groups(result.codes, result.scales, groupsize)
    info = {"refine_rounds": rounds, "refine_loss_ratio": result.loss_after / max(result.loss_before, 1e-30)}
    return refined, result.scales, info


def refine(W: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, groupsize: int, H: torch.Tensor,
           pruned: torch.Tensor = None, rounds: int = DEFAULT_ROUNDS) -> RefinedCodes:
    """``rounds`` rounds of (code pass, scale solve) from ``(codes, scales)`` towards ``W``.

    ``W`` [rows, cols]: the target (the weight the quantizer was given); ``H`` [cols, cols]: the
    (dampened) Hessian; ``pruned`` (bool, True = removed) marks weights that must stay zero.
    """
    check_rounds(rounds)
    W = W.float()
    H = H.float().to(W.device)
    codes = codes.to(torch.int8).clone()
    scales = scales.float().clone()
    keep = None if pruned is None else ~pruned
    with no_tf32():  # the steps compare losses that differ in the 4th digit
        before = _row_losses(W, codes, scales, groupsize, H).sum()
        for _ in range(rounds):
            _code_pass(W, codes, scales, groupsize, H, keep)
            scales = _solve_scales(W, codes, scales, groupsize, H)
        after = _row_losses(W, codes, scales, groupsize, H).sum()
    return RefinedCodes(codes, scales, float(before), float(after))


def _code_pass(W, codes, scales, groupsize, H, keep):
    """One coordinate-descent pass over the columns; updates ``codes`` in place."""
    S = int4_grid.expand_scales(scales, groupsize)
    Q = codes.float() * S
    grad = (Q - W).matmul(H)
    diag = H.diagonal()
    cols = W.shape[1]
    for start in range(0, cols, _BLOCK):
        end = min(start + _BLOCK, cols)
        moved = torch.zeros(W.shape[0], end - start, device=W.device)
        for j in range(start, end):
            optimum = Q[:, j] - grad[:, j] / diag[j]
            q = int4_grid.quantize(optimum, S[:, j])
            if keep is not None:
                q = q * keep[:, j]
            step = q * S[:, j] - Q[:, j]
            Q[:, j] += step
            codes[:, j] = q.to(torch.int8)
            moved[:, j - start] = step
            grad[:, j + 1:end] += step[:, None] * H[j, j + 1:end]
        if end < cols:
            grad[:, end:] += moved.matmul(H[start:end, end:])


def _solve_scales(W, codes, scales, groupsize, H):
    """Least-squares group scales for fixed codes, rounded to fp16; per row, the better of old and new."""
    rows, cols = W.shape
    ngroups = cols // groupsize
    chunk = max(1, _SCALE_SYSTEM_BYTES // (4 * ngroups * cols))
    out = scales.clone()
    H_groups = H.reshape(ngroups, groupsize, cols)
    for r0 in range(0, rows, chunk):
        r1 = min(r0 + chunk, rows)
        q = codes[r0:r1].float().reshape(r1 - r0, ngroups, groupsize)
        # A_r = the [cols, ngroups] matrix whose column g holds row r's codes of group g:
        # normal equations (A^T H A) s = A^T H w.
        qH = torch.einsum("rgi,gic->rgc", q, H_groups)  # [r, ngroups, cols] = A^T H
        normal = torch.einsum("rghj,rhj->rgh", qH.reshape(r1 - r0, ngroups, ngroups, groupsize), q)
        rhs = torch.einsum("rgc,rc->rg", qH, W[r0:r1])
        empty = (q == 0).all(dim=2)  # groups with no nonzero code: their scale does not matter
        normal = normal + torch.diag_embed(empty.float())  # keeps the system regular
        solved = torch.linalg.lstsq(normal, rhs.unsqueeze(-1)).solution.squeeze(-1)
        solved = solved.to(torch.float16).float()
        old = scales[r0:r1]
        usable = torch.isfinite(solved) & (solved * old > 0)  # keeps each scale's sign
        new = torch.where(usable & ~empty, solved, old)
        better = (_row_losses(W[r0:r1], codes[r0:r1], new, groupsize, H)
                  < _row_losses(W[r0:r1], codes[r0:r1], old, groupsize, H))
        out[r0:r1] = torch.where(better[:, None], new, old)
    return out


def _row_losses(W, codes, scales, groupsize, H):
    dW = W - codes.float() * int4_grid.expand_scales(scales, groupsize)
    return (dW.matmul(H) * dW).sum(dim=1)
