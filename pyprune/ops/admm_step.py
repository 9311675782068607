"""The ADMM projection and dual step of the layer-wise pruning solver.

One step, given the primal iterate ``W`` and the scaled dual ``U`` (both ``[rows, cols]``):

    Z      <- mask(W + U)        keep the selected weights of W + U, zero the pruned ones
    U      <- U + W - Z          dual ascent (in place)
    rhs    <- rho * (Z - U)      the penalty term of the next primal solve

The mask is chosen on ``|W + U|`` by one of four selections (the ``mode`` of the CUDA binding):

    0  unstructured over the whole matrix: the ``k`` lowest scores of all weights
    1  unstructured per row: the ``k`` lowest scores of every row
    2  N:M: the ``m - n`` lowest of every group of ``m`` consecutive columns of a row
    3  a fixed mask given by the caller

Selection is :func:`pyprune.ops.selection.select_lowest`, the rule every solver uses: exact
counts, ties broken by position (lowest index pruned first).

The CUDA kernel of ``pyprune._C`` (``admm_step``) is used for contiguous float32 CUDA tensors
when the extension provides it; otherwise the PyTorch reference runs.
"""
from typing import NamedTuple, Optional

import torch

from pyprune.ops._extension import kernel_for
from pyprune.ops.selection import MODE_LAYER, MODE_NM, MODE_ROW, select_lowest

MODE_FIXED = 3


class AdmmStep(NamedTuple):
    Z: torch.Tensor  # float32 [rows, cols], zero where pruned
    U: torch.Tensor  # the dual after the step (the input tensor, updated in place)
    rhs: torch.Tensor  # rho * (Z - U)
    pruned: torch.Tensor  # bool [rows, cols], True = pruned


def admm_step(
    W: torch.Tensor,
    U: torch.Tensor,
    rho: float,
    *,
    k: Optional[int] = None,
    per_row: bool = False,
    nm: Optional[tuple] = None,
    pruned: Optional[torch.Tensor] = None,
) -> AdmmStep:
    """One projection + dual step (see the module docstring).

    Give exactly one selection: ``k`` (number pruned: in total, or per row with ``per_row``),
    ``nm=(n, m)`` (keep n of every m), or a fixed bool mask ``pruned``. ``U`` must be float32 and
    is updated in place; ``W`` is not modified.
    """
    mode, k, n, m = _selection(W, k, per_row, nm, pruned)
    if U.shape != W.shape or U.dtype != torch.float32 or W.dtype != torch.float32:
        raise ValueError(
            f"W and U must be float32 of one shape, got W {W.dtype} {tuple(W.shape)}, "
            f"U {U.dtype} {tuple(U.shape)}"
        )
    ext = kernel_for(W)
    # The kernel handles N:M groups of up to 64 columns; wider groups take the reference.
    if ext is not None and hasattr(ext, "admm_step") and W.is_contiguous() and U.is_contiguous() and m <= 64:
        if pruned is None:
            pruned = torch.empty(W.shape, dtype=torch.bool, device=W.device)
        elif not pruned.is_contiguous():
            pruned = pruned.contiguous()
        Z, rhs = ext.admm_step(W, U, float(rho), mode, k, n, m, pruned)
        return AdmmStep(Z, U, rhs, pruned)
    return admm_step_reference(W, U, rho, mode, k, n, m, pruned)


def admm_step_reference(W, U, rho, mode, k, n, m, pruned) -> AdmmStep:
    """The truth for the kernel: same arguments as the binding (``mode``, ``k``, ``n``, ``m``)."""
    V = W + U
    if mode != MODE_FIXED:
        pruned = select_lowest(V.abs(), mode, k, n, m)
    Z = V.masked_fill(pruned, 0.0)
    U.add_(W).sub_(Z)
    return AdmmStep(Z, U, float(rho) * (Z - U), pruned)


def _selection(W, k, per_row, nm, pruned):
    """``(mode, k, n, m)`` for the binding, after checking the arguments."""
    if W.dim() != 2:
        raise ValueError(f"W must be a matrix [rows, cols], got shape {tuple(W.shape)}")
    rows, cols = W.shape
    given = sum(x is not None for x in (k, nm, pruned))
    if given != 1:
        raise ValueError("give exactly one selection: k (count), nm=(n, m) or a fixed mask `pruned`")
    if pruned is not None:
        if pruned.shape != W.shape or pruned.dtype != torch.bool:
            raise ValueError(
                f"pruned must be a bool mask of shape {tuple(W.shape)}, got {pruned.dtype} {tuple(pruned.shape)}"
            )
        return MODE_FIXED, 0, 0, 0
    if nm is not None:
        n, m = (int(v) for v in nm)
        if not 0 < n < m or cols % m:
            raise ValueError(f"N:M = {n}:{m} is invalid for {cols} columns: need 0 < N < M and M dividing the width")
        return MODE_NM, 0, n, m
    k = int(k)
    limit = cols if per_row else rows * cols
    if not 0 <= k <= limit:
        raise ValueError(f"k={k} pruned weights is outside [0, {limit}] ({'per row' if per_row else 'in total'})")
    return (MODE_ROW if per_row else MODE_LAYER), k, 0, 0
