"""INT4 dequant-matmul: ``y = x @ (q * s)^T`` for the layout of ``pyprune.formats.int4``.

``qweight [N, K/8]`` int32 (field i of word j = code of column 8j+i, offset binary) and
``scales [K/G, N]`` fp16. A K tile never crosses a group (``BLOCK_K`` divides G), so the kernels
multiply the integer codes (exact in fp16/bf16) with x on the tensor cores and apply the group's
scale to the fp32 partial product: the dequantization is exact, whatever the activation dtype
(unless a configuration folds the scales into the fp16 tile, see ``scaled_dot_rows``).

Variants (see ``_common``): ``rows`` loads ``[BLOCK_N, BLOCK_K/8]`` words (contiguous along K),
decodes them to the ``[BLOCK_N, BLOCK_K]`` code tile in registers (two codes per AND-OR, see
``int4_word_fields``) and does one dot; ``tile``
rebuilds the ``[BLOCK_K, BLOCK_N]`` code tile; ``split`` (decode, needs G >= 128) loads the
``[BLOCK_K/8, BLOCK_N]`` words once and does one dot per field i against x's columns ``8j + i``;
``gemv`` (decode, offered by the tuner up to M = 2) loads ``[BLOCK_N, G/8]`` words per group
(each row's run along K is contiguous), decodes them field by field and multiplies each field
with x's columns ``8j + i`` (every row of x) on the CUDA cores, then applies the group's scale.
"""
import functools

import torch
import triton
import triton.language as tl

from ._common import (
    KernelLimits, as_2d, cdiv, check_activation, empty_result, check_config, check_fold, dot_tile, DENSE_VARIANTS,
    dense_matmul, expand_into, finish_split_k, rows_arguments, grid_and_buffers, interpreting, k_range,
    load_x_tile, m_bucket, pick_config, pow2_divisor, store_result, store_rows, program_tile, expand_blocks,
    int4_words_as, scaled_dot_rows, rows_accumulator, rows_result, word_field_code, FLOAT_2_23_BITS,
)

@triton.jit
def int4_codes_tile(qw_ptr, stride_qn, offs_k, offs_n, N):
    """Codes ``[BLOCK_K, BLOCK_N]`` (int32, -8..7) of columns offs_k of rows offs_n. Each word is
    fetched by the 8 lanes that need one of its fields (same address: served from L1)."""
    ptrs = qw_ptr + offs_n[None, :] * stride_qn + (offs_k // 8)[:, None]
    words = tl.load(ptrs, mask=offs_n[None, :] < N, other=0)
    return ((words >> ((offs_k % 8) * 4)[:, None]) & 0xF) - 8


@triton.jit
def _int4_tile_kernel(
    x_ptr, qw_ptr, s_ptr, bias_ptr, y_ptr, ws_ptr, done_ptr,
    M, N, K, stride_xm, stride_qn, stride_sg, tiles_per_group,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, GROUP_M: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
    REDUCE_IN_KERNEL: tl.constexpr,
):
    offs_m, offs_n, pid_k = program_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    start, end = k_range(pid_k, K // BLOCK_K, SPLIT_K)
    for t in range(start, end):
        offs_k = t * BLOCK_K + tl.arange(0, BLOCK_K)
        a = load_x_tile(x_ptr, offs_m, offs_k, stride_xm, M, K)
        q = int4_codes_tile(qw_ptr, stride_qn, offs_k, offs_n, N)
        s = tl.load(s_ptr + (t // tiles_per_group) * stride_sg + offs_n, mask=offs_n < N, other=0.0)
        acc += dot_tile(a, q, UPCAST) * s.to(tl.float32)[None, :]
    store_result(acc, y_ptr, ws_ptr, done_ptr, bias_ptr, offs_m, offs_n, M, N, pid_k,
                 SPLIT_K, HAS_BIAS, REDUCE_IN_KERNEL)


@triton.jit
def _int4_split_kernel(
    x_ptr, qw_ptr, s_ptr, bias_ptr, y_ptr, ws_ptr, done_ptr,
    M, N, K, stride_xm, stride_qn, stride_sg, tiles_per_group,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, GROUP_M: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
    REDUCE_IN_KERNEL: tl.constexpr,
):
    pid_n = tl.program_id(0)  # decode: one row tile holds all of x
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_w = tl.arange(0, BLOCK_K // 8)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    start, end = k_range(pid_k, K // BLOCK_K, SPLIT_K)
    for t in range(start, end):
        word = t * (BLOCK_K // 8) + offs_w
        words = tl.load(qw_ptr + offs_n[None, :] * stride_qn + word[:, None], mask=offs_n[None, :] < N, other=0)
        part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for i in tl.static_range(8):
            a = load_x_tile(x_ptr, offs_m, word * 8 + i, stride_xm, M, K)
            q = ((words >> (4 * i)) & 0xF) - 8
            part += dot_tile(a, q, UPCAST)
        s = tl.load(s_ptr + (t // tiles_per_group) * stride_sg + offs_n, mask=offs_n < N, other=0.0)
        acc += part * s.to(tl.float32)[None, :]
    store_result(acc, y_ptr, ws_ptr, done_ptr, bias_ptr, offs_m, offs_n, M, N, pid_k,
                 SPLIT_K, HAS_BIAS, REDUCE_IN_KERNEL)


@triton.jit
def _int4_rows_kernel(
    x_ptr, qw_ptr, s_ptr, bias_ptr, y_ptr, ws_ptr, done_ptr,
    M, N, K, stride_xm, stride_qn, stride_sg, tiles_per_group,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, GROUP_M: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
    REDUCE_IN_KERNEL: tl.constexpr,
    FOLD_SCALES: tl.constexpr, W_LEFT: tl.constexpr,
):
    offs_m, offs_n, pid_k = program_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_w = tl.arange(0, BLOCK_K // 8)
    acc = rows_accumulator(BLOCK_M, BLOCK_N, W_LEFT)
    start, end = k_range(pid_k, K // BLOCK_K, SPLIT_K)
    for t in range(start, end):
        a = load_x_tile(x_ptr, offs_m, t * BLOCK_K + tl.arange(0, BLOCK_K), stride_xm, M, K)
        words = tl.load(qw_ptr + offs_n[:, None] * stride_qn + (t * (BLOCK_K // 8) + offs_w)[None, :],
                        mask=(offs_n < N)[:, None], other=0)
        q = int4_words_as(words, a.dtype, UPCAST)
        s = tl.load(s_ptr + (t // tiles_per_group) * stride_sg + offs_n, mask=offs_n < N, other=0.0)
        acc = scaled_dot_rows(acc, a, q, s, FOLD_SCALES, UPCAST, W_LEFT)
    store_result(rows_result(acc, W_LEFT), y_ptr, ws_ptr, done_ptr, bias_ptr, offs_m, offs_n, M, N, pid_k,
                 SPLIT_K, HAS_BIAS, REDUCE_IN_KERNEL)


@triton.jit
def _int4_gemv_kernel(
    x_ptr, qw_ptr, s_ptr, bias_ptr, y_ptr, ws_ptr, done_ptr,
    M, N, K, stride_xm, stride_qn, stride_sg, magic,
    GROUPSIZE: tl.constexpr, SUB_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
    EVEN_N: tl.constexpr, REDUCE_IN_KERNEL: tl.constexpr,
):
    """Decode on the CUDA cores, counted in instructions per weight (the limit at M = 1).

    Each field is read in place (``word_field_code``: an AND-OR and an FMA per code, one shift
    per word). Rows of x past M repeat row M - 1 (their sums are not stored), so x's loads need
    no mask.

    The K tile is taken in sub-tiles of ``SUB_K`` columns (a power of two dividing G, so each
    lies in one quantization group), each loaded as ``[BLOCK_N, SUB_K / 8]`` words with one
    scale per row. Every tensor of the loop is that tile or a broadcast of it, so the compiler
    keeps them all in the layout of the words' vector load: no decoded value goes through
    shared memory.
    """
    pid_n = tl.program_id(0)  # decode: one row tile holds all of x
    pid_k = tl.program_id(1)
    WORDS: tl.constexpr = SUB_K // 8
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_w = tl.arange(0, WORDS)
    x_rows = tl.minimum(offs_m, M - 1)
    total = tl.zeros((BLOCK_M, BLOCK_N, WORDS), dtype=tl.float32)
    start, end = k_range(pid_k, tl.cdiv(K, BLOCK_K), SPLIT_K)
    for t in range(start, end):
        for sub in tl.static_range(BLOCK_K // SUB_K):
            col = t * BLOCK_K + sub * SUB_K
            word = col // 8 + offs_w
            inside = (col < K) | EVEN_K  # a sub-tile lies wholly inside or past K
            mask = (((offs_n < N) | EVEN_N)[None, :, None]) & inside
            words = tl.load(qw_ptr + offs_n[None, :, None] * stride_qn + word[None, None, :], mask=mask, other=0)
            high = words >> 12
            s = tl.load(s_ptr + (col // GROUPSIZE) * stride_sg + offs_n, mask=(offs_n < N) & (col < K), other=0.0)
            # part[m, n, j]: row m of x against the 8 codes of word j of row n. Each field is
            # decoded once and used for every row of x.
            part = tl.zeros((BLOCK_M, BLOCK_N, WORDS), dtype=tl.float32)
            for i in tl.static_range(8):
                xi = tl.load(x_ptr + x_rows[:, None, None] * stride_xm + (word * 8 + i)[None, None, :],
                             mask=inside, other=0.0)
                part += word_field_code(words, high, magic, i) * xi.to(tl.float32)
            total += part * s.to(tl.float32)[None, :, None]
    # Reduced over the words once, after the loop: no cross-lane sums per tile.
    acc = tl.sum(total, axis=2)
    store_result(acc, y_ptr, ws_ptr, done_ptr, bias_ptr, offs_m, offs_n, M, N, pid_k,
                 SPLIT_K, HAS_BIAS, REDUCE_IN_KERNEL)


_KERNELS = {"tile": _int4_tile_kernel, "split": _int4_split_kernel, "rows": _int4_rows_kernel}


@triton.jit
def _int4_dequant_kernel(
    qw_ptr, s_ptr, out_ptr, N, K, stride_qn, stride_sg, GROUPSIZE,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Rows of the dense weight, as the rows kernels decode them: ``[BLOCK_N, BLOCK_K/8]`` words
    loaded along K, each word's codes decoded in its thread (exact in fp16), ``q * s`` in fp32 with
    one scale per row (``BLOCK_K`` divides the group size, so also K), stored along each row."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    t = tl.program_id(1)
    offs_w = t * (BLOCK_K // 8) + tl.arange(0, BLOCK_K // 8)
    words = tl.load(qw_ptr + offs_n[:, None] * stride_qn + offs_w[None, :], mask=(offs_n < N)[:, None], other=0)
    s = tl.load(s_ptr + (t * BLOCK_K // GROUPSIZE) * stride_sg + offs_n, mask=offs_n < N, other=0.0)
    w = int4_words_as(words, tl.float16, False).to(tl.float32) * s.to(tl.float32)[:, None]
    store_rows(out_ptr, w, offs_n, t * BLOCK_K + tl.arange(0, BLOCK_K), N, K)


def _check_packed(qweight, scales, groupsize):
    if qweight.dtype != torch.int32 or qweight.dim() != 2:
        raise TypeError(f"qweight must be a 2-D int32 tensor [N, K/8], got {qweight.dtype} {tuple(qweight.shape)}")
    n, k = qweight.shape[0], qweight.shape[1] * 8
    if groupsize <= 0 or k % groupsize or groupsize % 32:
        raise ValueError(f"groupsize={groupsize} must be a positive multiple of 32 dividing K={k}")
    if tuple(scales.shape) != (k // groupsize, n):
        raise ValueError(f"scales must have shape [K/G, N] = {(k // groupsize, n)}, got {tuple(scales.shape)}")
    return n, k


@functools.lru_cache(maxsize=None)  # one per group size: a launch asks for it
def int4_limits(groupsize: int) -> KernelLimits:
    # gemv: BLOCK_K 1024 spills registers, and 512 does at M = 2 under Triton 3.6
    # (bench/bench_kernel_instructions.py); above M = 2 the tensor-core kernels take fewer
    # instructions per weight.
    return KernelLimits(block_k_max=pow2_divisor(groupsize, 256), split_block_k=128, scaled=True,
                        gemv_block_n=(256, 128, 64), gemv_block_k=(256, 512), gemv_max_m=2)


def int4_dequantize(qweight, scales, groupsize: int, dtype=torch.float16):
    """Dense ``[N, K]`` weight in ``dtype`` (``q * s`` in fp32, then rounded)."""
    n, k = _check_packed(qweight, scales, groupsize)
    out = torch.empty((n, k), dtype=dtype, device=qweight.device)
    return expand_into(out, lambda target: dequantize_into(target, qweight, scales, groupsize))


def dequantize_into(out, qweight, scales, groupsize: int):
    """Write ``q * s`` into the contiguous ``out [N, K]``. Any group size dividing K that is a
    multiple of 8 (the 2:4 + INT4 format's kept codes use G/2)."""
    n, k = out.shape
    bn, bk = expand_blocks()
    bk = pow2_divisor(groupsize, bk)  # one scale per row of a tile
    _int4_dequant_kernel[(cdiv(n, bn), k // bk)](
        qweight, scales, out, n, k, qweight.stride(0), scales.stride(0), groupsize, BLOCK_N=bn, BLOCK_K=bk,
    )


def int4_matmul(x, qweight, scales, groupsize: int, bias=None, *, config=None):
    """``x [..., K]`` (fp16/bf16, CUDA or interpreter) times the packed INT4 weight, transposed:
    ``[..., N]`` in x's dtype, fp32 accumulation. ``config``: a KernelConfig to force one."""
    n, k = _check_packed(qweight, scales, groupsize)
    check_activation(x, k, "int4_matmul")
    x2 = as_2d(x)
    m = x2.shape[0]
    if m == 0:
        return empty_result(x, n)
    qweight, scales = qweight.contiguous(), scales.contiguous()
    limits = int4_limits(groupsize)

    def launch(cfg):
        check_config(cfg, limits, m)
        check_fold(cfg, x2.dtype)
        if cfg.variant in DENSE_VARIANTS:
            return dense_matmul(cfg, x2, n, lambda out, n0, n1: dequantize_into(
                out, qweight[n0:n1], scales[:, n0:n1], groupsize), bias)
        grid, y, ws, done = grid_and_buffers(x2, n, cfg, qweight)
        if cfg.variant == "gemv":
            _int4_gemv_kernel[grid](
                x2, qweight, scales, bias if bias is not None else y, y, ws, done,
                m, n, k, x2.stride(0), qweight.stride(0), scales.stride(0), FLOAT_2_23_BITS,
                GROUPSIZE=groupsize, SUB_K=pow2_divisor(groupsize, cfg.block_k), BLOCK_M=cfg.block_m,
                BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                SPLIT_K=cfg.split_k, HAS_BIAS=bias is not None, EVEN_K=k % cfg.block_k == 0,
                REDUCE_IN_KERNEL=done is not None,
                EVEN_N=n % cfg.block_n == 0, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            )
            return finish_split_k(ws, y, bias, cfg, x2.dtype, done)
        _KERNELS[cfg.variant][grid](
            x2, qweight, scales, bias if bias is not None else y, y, ws, done,
            m, n, k, x2.stride(0), qweight.stride(0), scales.stride(0), groupsize // cfg.block_k,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT_K=cfg.split_k,
            REDUCE_IN_KERNEL=done is not None,
            GROUP_M=cfg.group_m, HAS_BIAS=bias is not None, UPCAST=interpreting(),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **rows_arguments(cfg, limits),
        )
        return finish_split_k(ws, y, bias, cfg, x2.dtype, done)

    if config is None:
        key = ("int4", m_bucket(m), n, k, groupsize, x2.dtype, x2.device)
        # Dense fallback only in fp16: rounding q*s to bf16 would cost ~2^-9 relative error.
        config = pick_config(key, m, n, k, limits, x2.device, launch, allow_dense=x2.dtype == torch.float16)
    return launch(config).reshape(*x.shape[:-1], n)
