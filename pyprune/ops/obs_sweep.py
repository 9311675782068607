"""The blockwise OBS column sweep shared by SparseGPT and GPTQ.

Columns are frozen left to right. Freezing column ``j`` replaces ``w_j`` by its target ``q_j``
(0 if pruned, its grid point if quantized, both if both) and spreads the error over the columns
still free, using row ``j`` of ``U`` (upper Cholesky factor of the inverse Hessian):
``err = (w_j - q_j) / U_jj``; ``W[:, j:] -= err * U[j, j:]``. Inside a block of ``blocksize``
columns this happens column by column; the columns after the block get the block's errors at
once (one GEMM, the "lazy" update).

The loss returned is the exact value of ``0.5 * tr(dW H_damped dW^T)`` (sum of ``err^2 / 2``),
i.e. the mean per-token squared reconstruction error under the dampened Hessian.
"""
from dataclasses import dataclass
from typing import Optional

import torch

from pyprune.ops import int4_grid
from pyprune.ops._extension import kernel_for
from pyprune.ops.hessian import no_tf32


@dataclass
class QuantSpec:
    """How to quantize inside the sweep.

    ``groupsize``: columns per scale (already resolved: ``in_features`` for per-channel).
    ``static_scales``: ``[rows, ngroups]`` scales fitted before the sweep (act-order with static
    groups); ``group_of_column[j]`` is then the group of swept column ``j``. Without static scales,
    a group's scale is fitted when the sweep reaches its first column, from the weights as updated
    so far (pruned entries of that group already known to be zero are excluded).
    ``scale_fit``: how such a scale is fitted (``int4_grid.SCALE_FITS``). With ``"mse"``, the
    rounding error of column ``j`` is weighted by ``1 / U_jj^2``, the factor by which freezing that
    column turns its error into reconstruction loss.
    """

    groupsize: int
    static_scales: Optional[torch.Tensor] = None
    group_of_column: Optional[torch.Tensor] = None
    scale_fit: str = "minmax"


@dataclass
class SweepResult:
    weight: torch.Tensor  # float32 [rows, cols]
    pruned: torch.Tensor  # bool [rows, cols], True where the weight was removed
    loss: float
    scales: Optional[torch.Tensor]  # float32 [rows, ngroups] when quantized


def obs_sweep(
    W: torch.Tensor,
    U: torch.Tensor,
    *,
    sparsity: float = 0.0,
    nm: Optional[tuple] = None,
    pruned: Optional[torch.Tensor] = None,
    quant: Optional[QuantSpec] = None,
    blocksize: int = 128,
) -> SweepResult:
    """Run the sweep on a float32 copy of ``W`` ([rows, cols]).

    Exactly one way of choosing what to prune may be given:
    ``sparsity`` (unstructured: in every block the ``round(sparsity * numel)`` weights of smallest
    ``w^2 / U_jj^2`` go), ``nm=(n, m)`` (keep ``n`` of every ``m`` consecutive columns in each row,
    chosen on the already-updated weights when the sweep reaches the group), or ``pruned`` (a fixed
    bool mask, True = remove). ``quant`` adds INT4 quantization of the kept weights.
    """
    rows, cols = W.shape
    if U.shape != (cols, cols):
        raise ValueError(f"U must be [{cols}, {cols}] for W of shape {tuple(W.shape)}, got {tuple(U.shape)}")
    if nm is not None:
        n, m = nm
        if cols % m or blocksize % m:
            raise ValueError(f"N:M group size {m} must divide the width {cols} and the block size {blocksize}")
    if quant is not None:
        _check_quant(quant, rows, cols, blocksize)

    with no_tf32():
        W = W.float().clone()
        U = U.float().contiguous()  # the kernel reads row-major blocks of U
        prune = torch.zeros(rows, cols, dtype=torch.bool, device=W.device) if pruned is None else pruned.clone()
        ngroups = cols // quant.groupsize if quant is not None else 0
        scales = None
        if quant is not None:
            scales = quant.static_scales.clone().float() if quant.static_scales is not None else \
                torch.zeros(rows, ngroups, device=W.device)
        loss = torch.zeros(rows, device=W.device, dtype=torch.float64)
        scale = None
        fit_weight = torch.diag(U).pow(-2) if quant is not None and quant.scale_fit.endswith("mse") else None
        spanning = quant is not None and quant.static_scales is None and quant.groupsize > blocksize
        for i1 in range(0, cols, blocksize):
            i2 = min(i1 + blocksize, cols)
            W1 = W[:, i1:i2].clone()
            U1 = U[i1:i2, i1:i2]
            prune1 = prune[:, i1:i2].clone()
            if pruned is None and nm is None and sparsity > 0:
                _select_unstructured(W1, U1, prune1, sparsity)
            # A group reaching past this block is fitted partly on columns not swept yet; a
            # fixed mask's pruned weights there must not widen its scale.
            Wfit = W.masked_fill(prune, 0.0) if pruned is not None and spanning else W
            Q1, Err1, scale, block_loss = _sweep_block(W1, U1, prune1, nm, quant, scales, Wfit, i1, i2, scale,
                                                       fit_weight)
            loss += block_loss
            prune[:, i1:i2] = prune1
            W[:, i1:i2] = Q1
            W[:, i2:] -= Err1.matmul(U[i1:i2, i2:])
        W[prune] = 0.0
    return SweepResult(weight=W, pruned=prune, loss=float(loss.sum()), scales=scales)


def _check_quant(quant, rows, cols, blocksize):
    int4_grid.check_scale_fit(quant.scale_fit)
    g = quant.groupsize
    if g <= 0 or cols % g:
        raise ValueError(f"groupsize {g} must divide the width {cols}")
    if quant.static_scales is not None:
        if tuple(quant.static_scales.shape) != (rows, cols // g):
            raise ValueError(
                f"static_scales must be [{rows}, {cols // g}], got {tuple(quant.static_scales.shape)}"
            )
        if quant.group_of_column is None or quant.group_of_column.numel() != cols:
            raise ValueError(f"static_scales need group_of_column with one group index per column ({cols})")
    elif not (blocksize % g == 0 or g % blocksize == 0 or g == cols):
        # A per-channel group (g == cols) may end inside a block; other groups must nest.
        raise ValueError(f"groupsize {g} must nest with block size {blocksize} (one divides the other)")


def _select_unstructured(W1, U1, prune1, sparsity):
    score = W1.pow(2) / torch.diag(U1).reshape(1, -1).pow(2)
    k = int(round(score.numel() * sparsity))
    if k > 0:
        idx = torch.topk(score.flatten(), k, largest=False).indices
        prune1.view(-1)[idx] = True


def _sweep_block(W1, U1, prune1, nm, quant, scales, W, i1, i2, scale, fit_weight=None):
    """Freeze columns ``i1..i2`` one by one (W1, prune1 updated in place)."""
    ext = kernel_for(W1)
    if ext is not None and _kernel_fits(W1, nm, quant):
        return _sweep_block_cuda(ext, W1, U1, prune1, nm, quant, scales, W, i1, i2, scale)
    with _single_thread_on_cpu(W1):
        return _sweep_block_reference(W1, U1, prune1, nm, quant, scales, W, i1, i2, scale, fit_weight)


class _single_thread_on_cpu:
    """The column loop is hundreds of tiny ops: on CPU, extra threads only add sync overhead
    (and collapse when the machine is shared), so it runs on one thread."""

    def __init__(self, tensor):
        self.active = tensor.device.type == "cpu"

    def __enter__(self):
        if self.active:
            self.threads = torch.get_num_threads()
            torch.set_num_threads(1)

    def __exit__(self, *exc):
        if self.active:
            torch.set_num_threads(self.threads)


def _sweep_block_reference(W1, U1, prune1, nm, quant, scales, W, i1, i2, scale, fit_weight=None):
    rows, count = W1.shape
    Q1 = torch.zeros_like(W1)
    Err1 = torch.zeros_like(W1)
    loss = torch.zeros(rows, device=W1.device, dtype=torch.float64)
    diag = torch.diag(U1)
    for i in range(count):
        j = i1 + i
        if nm is not None and j % nm[1] == 0:
            n, m = nm
            score = W1[:, i:i + m].pow(2) / diag[i:i + m].reshape(1, -1).pow(2)
            drop = torch.topk(score, m - n, dim=1, largest=False).indices
            prune1.scatter_(1, i + drop, True)
        w = W1[:, i]
        q = w.masked_fill(prune1[:, i], 0.0)
        if quant is not None:
            scale = _scale_for_column(quant, scales, W1, prune1, W, i, j, i2, scale, fit_weight)
            q = int4_grid.fake_quantize(q, scale.flatten()).masked_fill(prune1[:, i], 0.0)
        Q1[:, i] = q
        d = diag[i]
        err = (w - q) / d
        loss += (err.double() ** 2) / 2
        W1[:, i:].addr_(err, U1[i, i:], alpha=-1.0)
        Err1[:, i] = err
    return Q1, Err1, scale, loss


def _scale_for_column(quant, scales, W1, prune1, W, i, j, i2, scale, fit_weight=None):
    g = quant.groupsize
    if quant.static_scales is not None:
        return scales[:, quant.group_of_column[j]].reshape(-1, 1)
    if j % g:
        return scale
    if i + g <= W1.shape[1]:  # group inside this block: use its updated weights
        group = W1[:, i:i + g].masked_fill(prune1[:, i:i + g], 0.0)
    else:  # group reaches past the block: the block's updated part + the rest as it is now
        group = torch.cat([W1[:, i:].masked_fill(prune1[:, i:], 0.0), W[:, i2:j + g]], dim=1)
    weight = None if fit_weight is None else fit_weight[j:j + g].reshape(1, -1)
    scale = int4_grid.fit_scale(group, quant.scale_fit, weight)
    scales[:, j // g] = scale.flatten()
    return scale


# What the fused kernel (csrc/obs_block.cu) handles: blocks of up to 128 columns (its block of U
# lives in shared memory) and N:M groups whose size divides the warp width.
_KERNEL_MAX_COLS = 128
_KERNEL_GROUPS = (2, 4, 8, 16, 32)
_KERNEL_FITS = ("minmax", "signed")


def _kernel_fits(W1, nm, quant):
    # The kernel fits scales by min-max or "signed" (no mse search); static scales are fitted before the sweep.
    fit_ok = quant is None or quant.scale_fit in _KERNEL_FITS or quant.static_scales is not None
    return (W1.dtype == torch.float32 and W1.shape[1] <= _KERNEL_MAX_COLS and fit_ok
            and (nm is None or nm[1] in _KERNEL_GROUPS))


def _sweep_block_cuda(ext, W1, U1, prune1, nm, quant, scales, W, i1, i2, scale):
    """Fused kernel: one launch freezes the whole block (see csrc/obs_block.cu), same rule as
    :func:`_sweep_block_reference`. Fitted scales are fitted inside the kernel when it reaches a
    group; a group reaching past the block is given the columns after it (``tail``)."""
    n, m = nm if nm is not None else (0, 0)
    g, carry, tail, static, group_index = 0, None, None, None, None
    if quant is not None and quant.static_scales is not None:
        static = scales
        group_index = quant.group_of_column[i1:i2].to(device=W1.device, dtype=torch.int32)
    elif quant is not None:
        g = quant.groupsize
        if i1 % g:  # the block starts inside a group fitted in an earlier block
            carry = scale.reshape(-1).contiguous()
        last_start = (i2 - 1) // g * g
        if last_start >= i1 and last_start + g > i2:
            tail = W[:, i2:last_start + g]
    signed = quant is not None and quant.scale_fit == "signed"
    Q1, Err1, loss, block_scales = ext.obs_block(
        W1, U1, prune1, n, m, i1, g, carry_scale=carry, tail=tail, static_scales=static, group_index=group_index,
        signed_scales=signed,
    )
    if g and block_scales.shape[1]:
        first = -(-i1 // g)
        scales[:, first:first + block_scales.shape[1]] = block_scales
        scale = block_scales[:, -1:].clone()
    elif static is not None:
        scale = scales.index_select(1, group_index[-1:].long())
    return Q1, Err1, scale, loss
