"""2:4 sparse matmul: ``y = x @ W^T`` for the layout of ``pyprune.formats.sparse24``.

``values [N, K/2]`` fp16/bf16 (the two kept entries of every group of 4 columns) and
``meta [K/32, N]`` int32 (field g%8 of ``meta[g//8, n]`` = ``i0 | i1 << 2``). Column ``4g + p``
of row n is the first kept value if ``p == i0``, the second if ``p == i1``, else 0. Values are
used as stored (exact products), accumulation in fp32.

Variants (see ``_common``): ``rows`` reads the kept pairs as 32-bit words and the metadata words
(``[BLOCK_N, BLOCK_K/4]`` and ``[BLOCK_N, BLOCK_K/32]``, contiguous along K), spreads them into the
dense ``[BLOCK_N, BLOCK_K]`` tile in registers and does one dot; ``tile`` rebuilds the dense
``[BLOCK_K, BLOCK_N]`` tile of W^T; ``split`` (decode) loads the ``[BLOCK_K/4, BLOCK_N]`` kept pairs
once and does one dot per position p against x's columns ``4g + p``; ``gemv`` (decode, M <= 16)
reads the kept pair of each group as one 32-bit word (``[BLOCK_N, BLOCK_K/4]``, contiguous per
row), loads x's four columns of each group once, picks each kept value's column with selects and
reduces on the CUDA cores; ``cusparselt`` (prefill, fp16) multiplies on the sparse tensor cores
(``sparse_tensor_cores``).
"""
import torch
import triton
import triton.language as tl

from . import sparse_tensor_cores
from ._common import (
    KernelLimits, as_2d, cdiv, check_activation, empty_result, check_config, DENSE_VARIANTS, dense_matmul, dot_tile,
    expand_into, finish_split_k, grid_and_buffers, interpreting, k_range, load_x_tile, m_bucket,
    pick_config, store_result, store_rows, program_tile, expand_blocks, dot_rows, rows_accumulator, rows_arguments,
    rows_result, spread_sorted_pairs, unpack_fields, gemv_masks, lane_halves,
)

LIMITS = KernelLimits(block_k_max=256, split_block_k=64, sparse24=True)


@triton.jit
def group_positions(meta_ptr, stride_mg, grp, offs_n, mask):
    """Kept positions ``(i0, i1)``, int32 ``[len(grp), BLOCK_N]``, of groups ``grp``."""
    words = tl.load(meta_ptr + (grp // 8)[:, None] * stride_mg + offs_n[None, :], mask=mask, other=0)
    field = (words >> ((grp % 8) * 4)[:, None]) & 0xF
    return field & 3, field >> 2


@triton.jit
def kept_slots(meta_ptr, stride_mg, offs_k, offs_n, mask):
    """For the dense tile ``[BLOCK_K, BLOCK_N]``: (is first kept slot, is second kept slot)."""
    i0, i1 = group_positions(meta_ptr, stride_mg, offs_k // 4, offs_n, mask)
    pos = (offs_k % 4)[:, None]
    return pos == i0, pos == i1


@triton.jit
def sparse24_tile(val_ptr, meta_ptr, stride_vn, stride_mg, offs_k, offs_n, K, N):
    """Dense ``[BLOCK_K, BLOCK_N]`` tile of W^T in the value dtype (0 outside the matrix)."""
    mask = (offs_k[:, None] < K) & (offs_n[None, :] < N)
    first, second = kept_slots(meta_ptr, stride_mg, offs_k, offs_n, mask)
    ptrs = val_ptr + offs_n[None, :] * stride_vn + (2 * (offs_k // 4))[:, None]
    v0 = tl.load(ptrs, mask=mask, other=0.0)
    v1 = tl.load(ptrs + 1, mask=mask, other=0.0)
    return tl.where(first, v0, tl.where(second, v1, tl.zeros_like(v0)))


@triton.jit
def _sparse24_tile_kernel(
    x_ptr, val_ptr, meta_ptr, bias_ptr, y_ptr, ws_ptr, done_ptr,
    M, N, K, stride_xm, stride_vn, stride_mg,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, GROUP_M: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
    REDUCE_IN_KERNEL: tl.constexpr,
):
    offs_m, offs_n, pid_k = program_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    start, end = k_range(pid_k, tl.cdiv(K, BLOCK_K), SPLIT_K)
    for t in range(start, end):
        offs_k = t * BLOCK_K + tl.arange(0, BLOCK_K)
        a = load_x_tile(x_ptr, offs_m, offs_k, stride_xm, M, K)
        w = sparse24_tile(val_ptr, meta_ptr, stride_vn, stride_mg, offs_k, offs_n, K, N)
        acc += dot_tile(a, w, UPCAST)
    store_result(acc, y_ptr, ws_ptr, done_ptr, bias_ptr, offs_m, offs_n, M, N, pid_k,
                 SPLIT_K, HAS_BIAS, REDUCE_IN_KERNEL)


@triton.jit
def _sparse24_split_kernel(
    x_ptr, val_ptr, meta_ptr, bias_ptr, y_ptr, ws_ptr, done_ptr,
    M, N, K, stride_xm, stride_vn, stride_mg,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, GROUP_M: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
    REDUCE_IN_KERNEL: tl.constexpr,
):
    pid_n = tl.program_id(0)  # decode: one row tile holds all of x
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_g = tl.arange(0, BLOCK_K // 4)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    start, end = k_range(pid_k, tl.cdiv(K, BLOCK_K), SPLIT_K)
    for t in range(start, end):
        grp = t * (BLOCK_K // 4) + offs_g
        mask = (grp < K // 4)[:, None] & (offs_n < N)[None, :]
        i0, i1 = group_positions(meta_ptr, stride_mg, grp, offs_n, mask)
        ptrs = val_ptr + offs_n[None, :] * stride_vn + (2 * grp)[:, None]
        v0 = tl.load(ptrs, mask=mask, other=0.0)
        v1 = tl.load(ptrs + 1, mask=mask, other=0.0)
        zero = tl.zeros_like(v0)
        for p in tl.static_range(4):
            a = load_x_tile(x_ptr, offs_m, grp * 4 + p, stride_xm, M, K)
            w = tl.where(i0 == p, v0, tl.where(i1 == p, v1, zero))
            acc += dot_tile(a, w, UPCAST)
    store_result(acc, y_ptr, ws_ptr, done_ptr, bias_ptr, offs_m, offs_n, M, N, pid_k,
                 SPLIT_K, HAS_BIAS, REDUCE_IN_KERNEL)


@triton.jit
def meta_fields_rows(meta_ptr, stride_mg, offs_n, t, N, K, BLOCK_K: tl.constexpr):
    """Metadata fields ``i0 | i1 << 2``, int32 ``[BLOCK_N, BLOCK_K/4]``, of the groups of K tile
    ``t``: the tile's ``BLOCK_K/32`` metadata words per row, each loaded once and unpacked in
    registers (``BLOCK_K`` and K are multiples of 32, so a tile never ends inside a word; words past
    K read 0)."""
    word = t * (BLOCK_K // 32) + tl.arange(0, BLOCK_K // 32)
    mask = (offs_n < N)[:, None] & (word < K // 32)[None, :]
    words = tl.load(meta_ptr + word[None, :] * stride_mg + offs_n[:, None], mask=mask, other=0)
    return unpack_fields(words, 4, 8)


@triton.jit
def kept_position_bits(meta_ptr, stride_mg, offs_n, t, N, K, BLOCK_K: tl.constexpr):
    """The kept positions ``(i0, i1)`` of the groups of K tile ``t`` as bits, for the gemv
    variants: boolean ``[BLOCK_N, BLOCK_K/4]`` tensors ``(i0 & 1, i0 & 2, i1 & 1, i1 & 2)``."""
    field = meta_fields_rows(meta_ptr, stride_mg, offs_n, t, N, K, BLOCK_K)
    return (field & 1) != 0, (field & 2) != 0, (field & 4) != 0, (field & 8) != 0


@triton.jit
def pick_column(low, high, x0, x1, x2, x3):
    """``x_p`` for the position ``p = low + 2 * high`` (elementwise, broadcasting): the column of
    x a kept value multiplies, chosen in registers instead of gathered from memory."""
    return tl.where(high, tl.where(low, x3, x2), tl.where(low, x1, x0))


@triton.jit
def x_group_columns(x_ptr, stride_xm, offs_m, grp, x_mask):
    """``x[m, 4g + p]`` for ``p = 0..3``: four fp32 ``[BLOCK_M, 1, len(grp)]`` tensors, shared by
    every row of the weight tile."""
    base = x_ptr + offs_m[:, None, None] * stride_xm + 4 * grp[None, None, :]
    mask = x_mask[:, None, :]
    x0 = tl.load(base, mask=mask, other=0.0).to(tl.float32)
    x1 = tl.load(base + 1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(base + 2, mask=mask, other=0.0).to(tl.float32)
    x3 = tl.load(base + 3, mask=mask, other=0.0).to(tl.float32)
    return x0, x1, x2, x3


@triton.jit
def _sparse24_gemv_kernel(
    x_ptr, pair_ptr, meta_ptr, bias_ptr, y_ptr, ws_ptr, done_ptr,
    M, N, K, stride_xm, stride_pn, stride_mg,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, VALUE_DTYPE: tl.constexpr, EVEN_K: tl.constexpr,
    REDUCE_IN_KERNEL: tl.constexpr,
):
    """``pair_ptr``: the values viewed as int32 ``[N, K/4]``, one word per group (v0 low half).
    The four columns of x of each group are loaded once for the tile and each kept value picks its
    own with selects, so no load depends on the metadata."""
    pid_n = tl.program_id(0)  # decode: one row tile holds all of x
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_g = tl.arange(0, BLOCK_K // 4)
    total = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K // 4), dtype=tl.float32)
    start, end = k_range(pid_k, tl.cdiv(K, BLOCK_K), SPLIT_K)
    for t in range(start, end):
        grp = t * (BLOCK_K // 4) + offs_g
        mask, x_mask = gemv_masks(offs_m, offs_n, grp, M, N, K // 4, EVEN_K)
        pairs = tl.load(pair_ptr + offs_n[:, None] * stride_pn + grp[None, :], mask=mask, other=0)
        v0, v1 = lane_halves(pairs, VALUE_DTYPE, False)
        v0, v1 = v0.to(tl.float32), v1.to(tl.float32)
        a0, a1, b0, b1 = kept_position_bits(meta_ptr, stride_mg, offs_n, t, N, K, BLOCK_K)
        x0, x1, x2, x3 = x_group_columns(x_ptr, stride_xm, offs_m, grp, x_mask)
        total += v0[None, :, :] * pick_column(a0[None, :, :], a1[None, :, :], x0, x1, x2, x3)
        total += v1[None, :, :] * pick_column(b0[None, :, :], b1[None, :, :], x0, x1, x2, x3)
    acc = tl.sum(total, axis=2)  # over the groups once, after the loop
    store_result(acc, y_ptr, ws_ptr, done_ptr, bias_ptr, offs_m, offs_n, M, N, pid_k,
                 SPLIT_K, HAS_BIAS, REDUCE_IN_KERNEL)


@triton.jit
def sparse24_rows_tile(pair_ptr, meta_ptr, stride_pn, stride_mg, offs_n, t, N, K,
                       BLOCK_K: tl.constexpr, VALUE_DTYPE: tl.constexpr):
    """Dense rows ``[BLOCK_N, BLOCK_K]`` (value dtype, 0 past K) of K tile ``t``: each group's kept
    pair read as one word (``pair_ptr``: int32 ``[N, K/4]``, v0 in the low half) and spread to its
    positions with the metadata, all in the thread that loaded the word."""
    grp = t * (BLOCK_K // 4) + tl.arange(0, BLOCK_K // 4)
    mask = (offs_n < N)[:, None] & (grp < K // 4)[None, :]
    pairs = tl.load(pair_ptr + offs_n[:, None] * stride_pn + grp[None, :], mask=mask, other=0)
    v0, v1 = lane_halves(pairs, VALUE_DTYPE, False)
    field = meta_fields_rows(meta_ptr, stride_mg, offs_n, t, N, K, BLOCK_K)
    return spread_sorted_pairs(v0, v1, field)


@triton.jit
def _sparse24_rows_kernel(
    x_ptr, pair_ptr, meta_ptr, bias_ptr, y_ptr, ws_ptr, done_ptr,
    M, N, K, stride_xm, stride_pn, stride_mg,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, GROUP_M: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
    REDUCE_IN_KERNEL: tl.constexpr,
    VALUE_DTYPE: tl.constexpr, W_LEFT: tl.constexpr,
):
    """``pair_ptr``: the values viewed as int32 ``[N, K/4]``, one word per group (v0 low half)."""
    offs_m, offs_n, pid_k = program_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc = rows_accumulator(BLOCK_M, BLOCK_N, W_LEFT)
    start, end = k_range(pid_k, tl.cdiv(K, BLOCK_K), SPLIT_K)
    for t in range(start, end):
        a = load_x_tile(x_ptr, offs_m, t * BLOCK_K + tl.arange(0, BLOCK_K), stride_xm, M, K)
        w = sparse24_rows_tile(pair_ptr, meta_ptr, stride_pn, stride_mg, offs_n, t, N, K, BLOCK_K, VALUE_DTYPE)
        acc = dot_rows(acc, a, w, UPCAST, W_LEFT)
    store_result(rows_result(acc, W_LEFT), y_ptr, ws_ptr, done_ptr, bias_ptr, offs_m, offs_n, M, N, pid_k,
                 SPLIT_K, HAS_BIAS, REDUCE_IN_KERNEL)


_KERNELS = {"tile": _sparse24_tile_kernel, "split": _sparse24_split_kernel, "rows": _sparse24_rows_kernel}
_VALUE_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def _sparse24_dense_kernel(pair_ptr, meta_ptr, out_ptr, N, K, stride_pn, stride_mg,
                           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, VALUE_DTYPE: tl.constexpr):
    """Rows of the dense weight, decoded as the rows kernels do (``sparse24_rows_tile``)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    t = tl.program_id(1)
    w = sparse24_rows_tile(pair_ptr, meta_ptr, stride_pn, stride_mg, offs_n, t, N, K, BLOCK_K, VALUE_DTYPE)
    store_rows(out_ptr, w, offs_n, t * BLOCK_K + tl.arange(0, BLOCK_K), N, K)


def _check_packed(values, meta):
    if values.dim() != 2 or meta.dim() != 2 or meta.dtype != torch.int32:
        raise TypeError("2:4 expects values [N, K/2] and int32 meta [K/32, N]")
    n, k = values.shape[0], values.shape[1] * 2
    if tuple(meta.shape) != (k // 32, n) or k % 32:
        raise ValueError(f"meta must have shape [K/32, N] = {(k // 32, n)}, got {tuple(meta.shape)}")
    return n, k


def sparse24_to_dense(values, meta, dtype=None):
    """Dense ``[N, K]`` weight (exact; ``dtype`` defaults to the value dtype)."""
    n, k = _check_packed(values, meta)
    out = torch.empty((n, k), dtype=dtype or values.dtype, device=values.device)
    return expand_into(out, lambda target: _expand(target, values.contiguous(), meta))


def _expand(out, values, meta):
    """Launch the expand kernel: the dense rows of ``values`` (rows contiguous) and ``meta``
    (``[K/32, rows]``, any row stride) into the contiguous ``out``."""
    n, k = out.shape
    bn, bk = expand_blocks()
    _sparse24_dense_kernel[(cdiv(n, bn), cdiv(k, bk))](
        values.view(torch.int32), meta, out, n, k, values.stride(0) // 2, meta.stride(0),
        BLOCK_N=bn, BLOCK_K=bk, VALUE_DTYPE=_VALUE_DTYPES[values.dtype],
    )


def sparse24_matmul(x, values, meta, bias=None, *, config=None):
    """``x [..., K]`` (fp16/bf16) times the packed 2:4 weight, transposed: ``[..., N]`` in x's
    dtype. Values in another dtype than x are cast in registers."""
    n, k = _check_packed(values, meta)
    check_activation(x, k, "sparse24_matmul")
    x2 = as_2d(x)
    m = x2.shape[0]
    if m == 0:
        return empty_result(x, n)
    values, meta = values.contiguous(), meta.contiguous()

    def launch(cfg):
        check_config(cfg, LIMITS, m)
        if cfg.variant in DENSE_VARIANTS:
            return dense_matmul(cfg, x2, n, lambda out, n0, n1: _expand(out, values[n0:n1], meta[:, n0:n1]), bias)
        if cfg.variant == sparse_tensor_cores.VARIANT:
            return sparse_tensor_cores.sparse_matmul(x2, meta, n, k, lambda out: out.copy_(values),
                                                     sparse24_to_dense, bias)
        grid, y, ws, done = grid_and_buffers(x2, n, cfg, values)
        if cfg.variant == "gemv":
            _sparse24_gemv_kernel[grid](
                x2, values.view(torch.int32), meta, bias if bias is not None else y, y, ws, done,
                m, n, k, x2.stride(0), values.stride(0) // 2, meta.stride(0),
                BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT_K=cfg.split_k,
                REDUCE_IN_KERNEL=done is not None,
                HAS_BIAS=bias is not None, VALUE_DTYPE=_VALUE_DTYPES[values.dtype], EVEN_K=k % cfg.block_k == 0,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            )
            return finish_split_k(ws, y, bias, cfg, x2.dtype, done)
        if cfg.variant == "rows":
            _sparse24_rows_kernel[grid](
                x2, values.view(torch.int32), meta, bias if bias is not None else y, y, ws, done,
                m, n, k, x2.stride(0), values.stride(0) // 2, meta.stride(0),
                BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT_K=cfg.split_k,
                REDUCE_IN_KERNEL=done is not None,
                GROUP_M=cfg.group_m, HAS_BIAS=bias is not None, UPCAST=interpreting(),
                VALUE_DTYPE=_VALUE_DTYPES[values.dtype], num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                **rows_arguments(cfg, LIMITS),
            )
            return finish_split_k(ws, y, bias, cfg, x2.dtype, done)
        _KERNELS[cfg.variant][grid](
            x2, values, meta, bias if bias is not None else y, y, ws, done,
            m, n, k, x2.stride(0), values.stride(0), meta.stride(0),
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT_K=cfg.split_k,
            REDUCE_IN_KERNEL=done is not None,
            GROUP_M=cfg.group_m, HAS_BIAS=bias is not None, UPCAST=interpreting(),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        return finish_split_k(ws, y, bias, cfg, x2.dtype, done)

    if config is None:
        key = ("2:4", m_bucket(m), n, k, values.dtype, x2.dtype, x2.device)
        # The whole-weight paths (expand-then-cuBLAS, cuSPARSELt) where the values are in the
        # activation dtype: exact weights, and the bias added before the one rounding, in bf16 too
        # (rounded twice, the product plus the bias measured 2.9e-3 relative error in bf16).
        allow_dense = values.dtype == x2.dtype
        config = pick_config(key, m, n, k, LIMITS, x2.device, launch, allow_dense=allow_dense)
    return launch(config).reshape(*x.shape[:-1], n)
