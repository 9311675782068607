"""ADMM weight update and gradual ADMM pruning (Boža, "Fast and Effective Weight Update for Pruned
Large Language Models", TMLR 2024).

The layer problem is ``min ||(W0 - W) X||^2`` subject to a sparsity mask. Work happens in a
normalised space where ``XX^T`` has unit diagonal (``Hn = D^-1/2 H D^-1/2``, ``Wn = W D^1/2``), so
``|Wn|`` is the Wanda score, and with dampening ``Hd = Hn + damp * I`` (``mean(diag Hn) = 1``).
ADMM splits the weights into a dense ``W`` and a masked copy ``Z`` tied by the scaled dual ``U``;
one inverse of ``A = Hd + rho I`` per layer serves every iteration:

    W <- (W0 Hd + rho (Z - U)) A^-1  =  W0 + rho (Z - U - W0) A^-1     primal solve: one matmul
    Z <- mask(W + U);  U <- U + W - Z                  projection + dual (pyprune.ops.admm_step)

Masks (``mask=``):
  ``"wanda"`` / ``"magnitude"``: fixed from the start (ADMM1 = Wanda mask + ADMM update).
  ``"gradual"`` (ADMM-Grad): re-selected on ``|W + U|`` during the first ``mask_steps``
  iterations, then fixed. With ``reselect="schedule"`` the pruned fraction follows the cubic
  schedule ``s_t = s (1 - (1 - (t+1)/mask_steps)^3)``; with ``reselect="final"`` every selection
  prunes the final fraction (what the published code does for unstructured layer-wide masks;
  for N:M it selects the exact N:M mask every time). ``"schedule"`` is the default: under the
  P1 protocol on SmolLM2-135M it gave lower perplexity and lower mean layer error than ``"final"``
  at 60, 70 and 80 % (bench/results/p1_h100.md), although on a few layers alone the two had
  looked even (bench/bench_admm_layers.py). N:M patterns are honoured as given: a 4:8 layer ends as 4:8.
  During an N:M schedule the ``n`` largest of each group are protected and the lowest ``s_t`` of
  the rest (over the whole layer) are pruned, which reaches exact N:M at ``s_t = s``.

``final_solve``: after ADMM, the weights are replaced by the minimiser of the same damped
objective on the final mask, so the result is the optimum for its mask rather than close to it.
``final_method="cg"`` (default) runs conjugate gradients on all rows at once, warm-started from
the ADMM iterate, until the masked residual is below ``1e-5`` of the masked right-hand side
(the normalised damped Hessian has eigenvalues in [damp, ~50] on real layers, so a few tens of
matmuls at most); ``"cholesky"`` solves row by row on the kept support with batched Cholesky
of the sub-Hessians (exact, slower on CPU).

Dead inputs (zero Hessian diagonal) get weight 0.
"""
import math

import torch

from pyprune.ops.admm_step import admm_step
from pyprune.ops.hessian import no_tf32, tf32_matmuls
from pyprune.ops.selection import MODE_LAYER, select_lowest
from pyprune.solvers import wanda
from pyprune.solvers.base import LayerStats, SolverResult, reconstruction_loss
from pyprune.solvers.pattern import SparsityPattern, select_pruned

MASKS = ("gradual", "wanda", "magnitude")
RESELECT = ("final", "schedule")
FINAL_METHODS = ("cg", "cholesky")
# Precision of the iteration matmuls on CUDA: "tf32" runs them on the tensor cores (about 8x the
# fp32 rate on an H100); "fp16" casts both operands to fp16 (the same 10-bit mantissa as TF32, at
# twice its rate; the right-hand side is scaled per row into fp16's range). The factorisation, the
# loss and the final solve stay fp32. On CPU every precision computes in fp32.
PRECISIONS = ("fp32", "tf32", "fp16")

# Conjugate-gradient final solve: stop at this masked residual relative to the masked
# right-hand side, or after this many iterations.
CG_TOL = 1e-5
CG_MAX_ITERS = 100

# Floats per chunk of gathered sub-Hessians in the final solve (64 MiB).
_CHUNK_FLOATS = 1 << 24


def solve(
    W: torch.Tensor,
    stats: LayerStats,
    pattern: SparsityPattern,
    *,
    iters: int = 20,
    mask_steps: int = 15,
    rho: float = 1.0,
    damp: float = 0.1,
    mask: str = "gradual",
    final_solve: bool = True,
    per_row: bool = False,
    reselect: str = "schedule",
    final_method: str = "cg",
    precision: str = "fp32",
    quant=None,
    **_,
) -> SolverResult:
    """Prune ``W`` [out, in] to ``pattern`` with the ADMM update.

    ``iters``: ADMM iterations (>= 1). ``mask_steps``: iterations during which a gradual mask is
    re-selected (0..iters; 0 selects once at the final sparsity). ``rho``: ADMM penalty (> 0).
    ``damp``: dampening as a fraction of the mean Hessian diagonal (>= 0). ``mask``: one of
    ``MASKS``. ``final_solve``: finish with the exact solve on the final mask. ``per_row``: a
    gradual unstructured mask prunes the same fraction of every output row instead of choosing
    over the whole layer. ``reselect``: ``"final"`` or ``"schedule"`` (see the module docstring).
    ``final_method``: ``"cg"`` or ``"cholesky"``. ``precision``: one of ``PRECISIONS``, for the
    matmuls of the ADMM iterations.

    ``info``: the options, ``admm_loss`` (loss of the ADMM iterate before the final solve),
    ``final_solve_gain`` (relative loss reduction by the final solve; it can be slightly negative
    because the final solve minimises the damped objective and the loss is undamped),
    ``final_iterations`` / ``final_residual`` (CG), ``dead_inputs``.
    """
    _check_options(iters, mask_steps, rho, damp, mask, reselect, final_method, quant)
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: allowed {', '.join(PRECISIONS)}")
    if stats is None or stats.H is None:
        raise ValueError("admm needs calibration statistics (a Hessian)")
    pattern.check_width(W.shape[1])
    rows, cols = W.shape
    if stats.H.shape != (cols, cols):
        raise ValueError(f"Hessian shape {tuple(stats.H.shape)} does not match a layer with {cols} inputs")

    with no_tf32():
        H = stats.H.to(device=W.device, dtype=torch.float32)
        problem = _normalise(W, H, damp)
        fixed = None
        if mask == "wanda":
            fixed = select_pruned(wanda.scores(W, LayerStats(H, stats.nsamples)), pattern, per_row=True)
        elif mask == "magnitude":
            fixed = select_pruned(W.abs().float(), pattern, per_row=False)
        with tf32_matmuls(precision == "tf32"):
            Z, pruned = _admm(problem, pattern, fixed, iters, mask_steps, rho, per_row, reselect, precision)

        W_admm = problem.to_original(Z, W.dtype)
        loss_admm = reconstruction_loss(W, W_admm, H)
        info = {
            "iterations": iters,
            "mask": mask,
            "mask_steps": mask_steps if mask == "gradual" else 0,
            "reselect": reselect if mask == "gradual" else None,
            "per_row": bool(per_row) if mask == "gradual" else None,
            "rho": rho,
            "damp": damp,
            "precision": precision,
            "dead_inputs": int(problem.dead.sum()),
            "admm_loss": loss_admm,
            "final_solve": bool(final_solve),
        }
        W_new, loss = W_admm, loss_admm
        if final_solve:
            info["final_method"] = final_method
            if final_method == "cg":
                X, info["final_iterations"], info["final_residual"] = masked_cg(problem.Hd, problem.G, Z, pruned)
            else:
                X, extra_damp = masked_least_squares(problem.Hd, problem.G, pruned)
                if extra_damp:
                    info["final_extra_damp"] = extra_damp
            W_new = problem.to_original(X, W.dtype)
            loss = reconstruction_loss(W, W_new, H)
            info["final_solve_gain"] = 1.0 - loss / loss_admm if loss_admm > 0 else 0.0
    return SolverResult(W_new, pruned, loss, info)


def exact_solve(W: torch.Tensor, stats: LayerStats, pruned: torch.Tensor, damp: float = 0.1,
                method: str = "cholesky", start: torch.Tensor = None):
    """The optimum of the damped layer problem on a given mask, in the original space.

    The final solve of :func:`solve`, usable on any mask: ``method="cholesky"`` is exact;
    ``"cg"`` iterates from ``start`` (original-space weights; default ``W`` masked) to the CG
    tolerance. Returns ``(W_new, info)``; ``W_new`` has ``W``'s dtype and zeros where ``pruned``
    and at dead inputs.
    """
    if stats is None or stats.H is None:
        raise ValueError("exact_solve needs calibration statistics (a Hessian)")
    if pruned.shape != W.shape or pruned.dtype != torch.bool:
        raise ValueError(f"pruned must be a bool mask of shape {tuple(W.shape)}, got {pruned.dtype} {tuple(pruned.shape)}")
    if method not in FINAL_METHODS:
        raise ValueError(f"method={method!r}: allowed {', '.join(FINAL_METHODS)}")
    with no_tf32():
        problem = _normalise(W, stats.H.to(device=W.device, dtype=torch.float32), damp)
        pruned = pruned.to(W.device)
        if method == "cg":
            X0 = (W if start is None else start).float() * problem.norm
            X, its, residual = masked_cg(problem.Hd, problem.G, X0, pruned)
            info = {"iterations": its, "residual": residual}
        else:
            X, extra_damp = masked_least_squares(problem.Hd, problem.G, pruned)
            info = {"extra_damp": extra_damp}
        return problem.to_original(X, W.dtype), info


def _check_options(iters, mask_steps, rho, damp, mask, reselect, final_method, quant):
    if quant is not None:
        raise ValueError("admm does not quantize; use sparsegpt for joint sparsity + INT4")
    if mask not in MASKS:
        raise ValueError(f"mask={mask!r}: allowed {', '.join(MASKS)}")
    if reselect not in RESELECT:
        raise ValueError(f"reselect={reselect!r}: allowed {', '.join(RESELECT)}")
    if final_method not in FINAL_METHODS:
        raise ValueError(f"final_method={final_method!r}: allowed {', '.join(FINAL_METHODS)}")
    if int(iters) != iters or iters < 1:
        raise ValueError(f"iters={iters}: need an integer >= 1")
    if int(mask_steps) != mask_steps or mask_steps < 0 or (mask == "gradual" and mask_steps > iters):
        raise ValueError(f"mask_steps={mask_steps}: need an integer in [0, iters={iters}] for a gradual mask")
    if not (math.isfinite(rho) and rho > 0):
        raise ValueError(f"rho={rho}: need a finite value > 0")
    if not (math.isfinite(damp) and damp >= 0):
        raise ValueError(f"damp={damp}: need a finite value >= 0")


class _Problem:
    """The layer problem in the unit-diagonal space.

    ``W0``: normalised weights; ``Hd``: damped normalised Hessian; ``G = W0 Hd`` (the right-hand
    side of the unconstrained normal equations, computed when first needed: the ADMM iterations
    do without it); ``norm``: per input ``sqrt(H_jj)``.
    """

    def __init__(self, W0, Hd, norm, dead):
        self.W0, self.Hd, self.norm, self.dead = W0, Hd, norm, dead
        self._G = None

    @property
    def G(self):
        if self._G is None:
            self._G = self.W0 @ self.Hd
        return self._G

    def to_original(self, Wn, dtype):
        out = Wn / self.norm
        out[:, self.dead] = 0.0
        return out.to(dtype)


def _normalise(W, H, damp) -> _Problem:
    diag = torch.diag(H)
    if not torch.isfinite(diag).all():
        raise ValueError("the Hessian has non-finite entries")
    dead = diag <= 0
    norm = torch.where(dead, torch.ones_like(diag), diag.clamp_min(0).sqrt())
    Hn = H / norm[:, None] / norm[None, :]
    Hn[dead, :] = 0.0
    Hn[:, dead] = 0.0
    idx = torch.arange(Hn.shape[0], device=H.device)
    Hn[idx, idx] = 1.0 + damp  # unit diagonal (dead inputs included) plus the dampening
    W0 = W.float() * norm
    W0[:, dead] = 0.0
    return _Problem(W0, Hn, norm, dead)


def _admm(problem, pattern, fixed, iters, mask_steps, rho, per_row, reselect, precision="fp32"):
    """ADMM iterations; returns the final masked iterate ``Z`` and its mask."""
    W0 = problem.W0
    Ainv = _penalised_inverse(problem.Hd, rho)
    primal = _primal_solver(W0, Ainv, rho, precision)
    W = W0.clone()
    U = torch.zeros_like(W)
    pruned = fixed
    steps = max(mask_steps, 1)
    for t in range(iters):
        if fixed is None and t < steps:
            selection = _gradual_selection(W, U, pattern, (t + 1) / steps, per_row, reselect)
        else:
            selection = {"pruned": pruned}
        step = admm_step(W, U, rho, **selection)
        pruned = step.pruned
        W = primal(step.rhs)
    Z = (W + U).masked_fill(pruned, 0.0)
    return Z, pruned


def _penalised_inverse(Hd, rho):
    """``(Hd + rho I)^-1`` in fp32 (Cholesky, then the inverse from the factor)."""
    A = Hd.clone()
    A.diagonal().add_(rho)
    L, status = torch.linalg.cholesky_ex(A)
    if status.item() != 0:
        raise ValueError("Cholesky of the normalised Hessian failed (is the Hessian positive semi-definite?)")
    return torch.cholesky_inverse(L)


def _primal_solve_fp16(W0, Ainv16, rho_W0, rhs):
    """``W0 + (rhs - rho W0) A^-1`` with fp16 operands: each row of the right-hand side is scaled
    by its largest magnitude first (fp16 overflows at 65504), the product is unscaled in fp32."""
    R = rhs.sub_(rho_W0)
    scale = R.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    prod = torch.matmul((R / scale).half(), Ainv16)
    return torch.addcmul(W0, prod.float(), scale)


def _primal_solver(W0, Ainv, rho, precision):
    """The primal update as a function of ``rhs = rho (Z - U)``: ``W0 + (rhs - rho W0) A^-1``,
    one matmul per iteration (no right-hand side ``W0 Hd`` to form). ``rhs`` is consumed."""
    rho_W0 = W0 * rho
    if precision == "fp16" and Ainv.is_cuda:
        Ainv16 = Ainv.half()  # A^-1 of the unit-diagonal problem: entries within (-1, 1)
        return lambda rhs: _primal_solve_fp16(W0, Ainv16, rho_W0, rhs)
    return lambda rhs: torch.addmm(W0, rhs.sub_(rho_W0), Ainv)


def cubic_sparsity(target: float, progress: float) -> float:
    """``s (1 - (1 - progress)^3)``: the pruned fraction after ``progress`` in (0, 1] of the steps."""
    return target * (1.0 - (1.0 - min(progress, 1.0)) ** 3)


def _gradual_selection(W, U, pattern, progress, per_row, reselect):
    """Keyword arguments of ``admm_step`` for one re-selection on ``|W + U|``."""
    rows, cols = W.shape
    final = reselect == "final" or progress >= 1.0
    if pattern.is_nm:
        if final:
            return {"nm": pattern.nm}
        score = (W + U).abs()
        keep = ~select_pruned(score, pattern)  # the n largest of each group stay
        count = int(round(cubic_sparsity(pattern.sparsity, progress) * W.numel()))
        return {"pruned": select_lowest(score.masked_fill_(keep, math.inf), MODE_LAYER, count)}
    s = pattern.sparsity if final else cubic_sparsity(pattern.sparsity, progress)
    if per_row:
        return {"k": int(round(s * cols)), "per_row": True}
    return {"k": int(round(s * W.numel()))}


def masked_cg(Hd: torch.Tensor, G: torch.Tensor, X0: torch.Tensor, pruned: torch.Tensor,
              tol: float = CG_TOL, max_iters: int = CG_MAX_ITERS):
    """Conjugate gradients for every row at once on ``Hd[S, S] x_S = G[i, S]`` (S = kept support).

    Warm-started from ``X0`` (zero where pruned). Stops when the masked residual is below ``tol``
    times the masked right-hand side (Frobenius norms). Returns ``(X, iterations, residual)``.
    """
    keep = ~pruned
    X = X0.masked_fill(pruned, 0.0)
    R = (G - X @ Hd).masked_fill_(pruned, 0.0)
    target = tol * float(G.masked_fill(pruned, 0.0).norm())
    P = R.clone()
    rr = (R * R).sum(1)
    its = 0
    while its < max_iters and float(rr.sum().sqrt()) > target:
        AP = (P @ Hd).masked_fill_(pruned, 0.0)
        alpha = rr / (P * AP).sum(1).clamp_min(torch.finfo(torch.float32).tiny)
        X.addcmul_(alpha[:, None], P)
        R.addcmul_(alpha[:, None], AP, value=-1.0)
        rr_new = (R * R).sum(1)
        P = R + (rr_new / rr.clamp_min(torch.finfo(torch.float32).tiny))[:, None] * P
        rr = rr_new
        its += 1
    X = X * keep
    return X, its, float(rr.sum().sqrt()) / max(target / tol, torch.finfo(torch.float32).tiny)


def masked_least_squares(Hd: torch.Tensor, G: torch.Tensor, pruned: torch.Tensor, max_attempts: int = 4):
    """Row-wise exact minimiser of ``(w - w0) Hd (w - w0)^T`` with ``w = 0`` where ``pruned``.

    ``G = W0 Hd``. For row ``i`` with kept support ``S``: ``Hd[S, S] w_S = G[i, S]``. Rows are
    sorted by their kept count and solved in chunks with batched Cholesky; padding entries get an
    identity block and zero right-hand side. Returns ``(W, extra_damp)``: ``extra_damp`` is the
    largest diagonal added to a chunk whose Cholesky failed (0.0 when none was needed).
    """
    rows, cols = G.shape
    out = torch.zeros_like(G)
    kept = (~pruned).sum(1)
    order = torch.argsort(kept)
    # Within a row, kept columns first in ascending position (stable sort), pruned after.
    support = torch.argsort(pruned.to(torch.int8), dim=1, stable=True)
    kept_sorted = kept[order].tolist()
    extra_damp = 0.0
    start = 0
    while start < rows:
        width = kept_sorted[start]
        if width == 0:
            start += 1
            continue
        # Largest chunk whose padded width (the count of its last row) fits the budget.
        end = start + 1
        while end < rows and (end + 1 - start) * kept_sorted[end] ** 2 <= _CHUNK_FLOATS:
            end += 1
        width = kept_sorted[end - 1]
        idx_rows = order[start:end]
        idx = support[idx_rows, :width]
        valid = torch.arange(width, device=G.device)[None, :] < kept[idx_rows][:, None]
        sub = Hd[idx[:, :, None], idx[:, None, :]]
        sub = sub * (valid[:, :, None] & valid[:, None, :])
        sub = sub + torch.diag_embed((~valid).to(sub.dtype))
        rhs = (G[idx_rows[:, None], idx] * valid).unsqueeze(-1)
        x, used = _cholesky_solve_damped(sub, rhs, max_attempts)
        extra_damp = max(extra_damp, used)
        block = torch.zeros(len(idx_rows), cols, dtype=G.dtype, device=G.device)
        block.scatter_(1, idx, x.squeeze(-1) * valid)
        out[idx_rows] = block
        start = end
    return out, extra_damp


def _cholesky_solve_damped(A, b, max_attempts):
    """Solve the batched SPD systems ``A x = b``; on failure add ``eps * mean diag`` and retry."""
    L, info = torch.linalg.cholesky_ex(A)
    if not info.any():
        return torch.cholesky_solve(b, L), 0.0
    mean_diag = A.diagonal(dim1=-2, dim2=-1).mean().item()
    eps = 1e-6
    for _ in range(max_attempts):
        Ad = A + eps * mean_diag * torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
        L, info = torch.linalg.cholesky_ex(Ad)
        if not info.any():
            return torch.cholesky_solve(b, L), eps
        eps *= 10.0
    raise ValueError(f"the final solve's sub-Hessians are not positive definite even with {eps / 10:g} x mean diag added")
