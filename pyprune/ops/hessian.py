"""Hessian accumulation and the upper Cholesky factor of its inverse.

Both are the reference implementations (plain PyTorch, float32, TF32 off); the CUDA kernels of
``pyprune._C`` are used instead when the tensors are on a GPU and the extension is loaded.

Normalisation: after ``n`` rows ``x`` (tokens) have been seen, ``H = (2/n) * sum x x^T``. The
same scale for every layer makes solver losses comparable across layers:
``0.5 * tr(dW H dW^T)`` is the mean over tokens of ``||dW x||^2``.
"""
from dataclasses import dataclass

import torch

from pyprune.ops._extension import kernel_for


def no_tf32():
    """Context manager that turns TF32 off for matmuls inside solvers."""
    return _TF32Mode()


def tf32_matmuls(allowed: bool):
    """Context manager that sets whether CUDA float32 matmuls may use TF32 (restored on exit)."""
    return _TF32Mode(allowed)


class _TF32Mode:
    def __init__(self, allowed: bool = False):
        self.allowed = allowed

    def __enter__(self):
        self._matmul = torch.backends.cuda.matmul.allow_tf32
        self._cudnn = torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = self.allowed
        torch.backends.cudnn.allow_tf32 = self.allowed

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32 = self._matmul
        torch.backends.cudnn.allow_tf32 = self._cudnn


def accumulate_hessian(H: torch.Tensor, nsamples: int, x: torch.Tensor) -> int:
    """Fold a batch of inputs into ``H`` in place; returns the new sample count.

    ``x`` is ``[..., in_features]``; every leading index is one sample (token).
    ``H <- H * n/(n+b) + (2/(n+b)) * x^T x`` keeps ``H`` a running mean, so it never overflows.
    """
    x = x.reshape(-1, x.shape[-1])
    b = x.shape[0]
    if b == 0:
        return nsamples
    total = nsamples + b
    ext = kernel_for(H)
    if ext is not None and _kernel_accumulates(H, x):
        ext.accumulate_hessian(H, x.contiguous(), nsamples)  # one pass, x read in its own dtype
        return total
    with no_tf32():
        xf = x.float()
        H.mul_(nsamples / total)
        H.addmm_(xf.t(), xf, alpha=2.0 / total)
    return total


def _kernel_accumulates(H, x):
    """The CUDA kernel takes a contiguous float32 H and fp32/fp16/bf16 inputs on H's device."""
    return (
        H.dtype == torch.float32 and H.is_contiguous() and x.device == H.device
        and x.dtype in (torch.float32, torch.float16, torch.bfloat16)
    )


@dataclass
class HessianFactor:
    """Result of :func:`inverse_hessian_factor`.

    ``U``: upper triangular with ``U^T U = (H + damp*I)^-1`` (rows of U are the OBS rows).
    ``dead``: bool mask of input columns whose Hessian diagonal was zero.
    ``damp_fraction``: the dampening actually used, as a fraction of mean(diag H).
    ``attempts``: how many Cholesky tries it took (1 = no escalation).
    """

    U: torch.Tensor
    dead: torch.Tensor
    damp_fraction: float
    attempts: int


class CholeskyError(RuntimeError):
    pass


def fix_dead_columns(H: torch.Tensor) -> torch.Tensor:
    """Give zero-diagonal (dead) inputs a unit diagonal in place; returns the dead mask."""
    dead = torch.diag(H) == 0
    if dead.any():
        idx = torch.nonzero(dead).flatten()
        H[idx, idx] = 1.0
    return dead


def inverse_hessian_factor(
    H: torch.Tensor, damp_fraction: float = 0.01, max_attempts: int = 4
) -> HessianFactor:
    """Upper Cholesky factor of ``(H + damp*I)^-1`` with ``damp = damp_fraction * mean(diag H)``.

    ``H`` is copied, never modified. When the Cholesky factorisation fails (H indefinite or too
    ill-conditioned in float32) the dampening is multiplied by 10 and retried, up to
    ``max_attempts`` times; only then :class:`CholeskyError` is raised.
    """
    if H.dim() != 2 or H.shape[0] != H.shape[1]:
        raise ValueError(f"H must be a square matrix, got shape {tuple(H.shape)}")
    ext = kernel_for(H)
    if ext is not None and H.shape[0] <= _KERNEL_MAX_ORDER:
        U, dead, used, attempts, status = ext.inverse_hessian_factor(
            H.float().contiguous(), float(damp_fraction), int(max_attempts)
        )
        if status != 0:
            raise CholeskyError(
                f"Cholesky of the dampened Hessian failed {attempts} times (dampening raised from "
                f"{damp_fraction:g} to {used:g} x mean diag); last failure: {_factor_status(status)}"
            )
        return HessianFactor(U, dead.bool(), used, attempts)
    return _inverse_hessian_factor_reference(H, damp_fraction, max_attempts)


_KERNEL_MAX_ORDER = 46340  # cuSOLVER's 32-bit potrf: n * n must fit an int


def _factor_status(status):
    """Text of the numerical status of ``pyprune._C.inverse_hessian_factor``."""
    if status > 0:
        return f"pivot {status} of the (row-reversed) Cholesky factorisation not positive"
    if status == -1:
        return "the factor of the inverse was singular or not finite"
    return "no attempt was made (max_attempts < 1)"


def _inverse_hessian_factor_reference(H, damp_fraction, max_attempts):
    with no_tf32():
        H = H.float().clone()
        dead = fix_dead_columns(H)
        mean_diag = torch.mean(torch.diag(H)).item()
        diag = torch.arange(H.shape[0], device=H.device)
        fraction = damp_fraction
        for attempt in range(1, max_attempts + 1):
            Hd = H.clone()
            Hd[diag, diag] += fraction * mean_diag
            L, info = torch.linalg.cholesky_ex(Hd)
            if info.item() == 0:
                Hinv = torch.cholesky_inverse(L)
                U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
                if info.item() == 0 and torch.isfinite(U).all():
                    return HessianFactor(U, dead, fraction, attempt)
            fraction *= 10.0
    raise CholeskyError(
        f"Cholesky of the dampened Hessian failed {max_attempts} times "
        f"(dampening raised from {damp_fraction:g} to {fraction / 10:g} x mean diag)"
    )
