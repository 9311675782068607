"""2:4 + INT4 matmul: ``y = x @ (q * s)^T`` for the layout of ``pyprune.formats.sparse24_int4``.

``qvalues [N, K/16]`` int32 (the kept codes, 8 per word, offset binary; the pair of group g is
fields 2(g%4), 2(g%4)+1 of word g//4), ``meta [K/32, N]`` int32 (as for 2:4) and
``scales [K/G, N]`` fp16. Integer codes (exact in fp16/bf16) go through the tensor cores and the
group scale is applied to the fp32 partial product (``BLOCK_K`` divides G): exact dequantization
(unless a configuration folds the scales into the fp16 tile, see ``scaled_dot_rows``).

Variants (see ``_common``): ``rows`` loads ``[BLOCK_N, BLOCK_K/16]`` code words and the metadata
words (contiguous along K), spreads the kept codes into the ``[BLOCK_N, BLOCK_K]`` tile in registers
(at ``BLOCK_M <= 16`` with :func:`spread_kept_codes`) and does one dot; ``tile`` rebuilds the dense
code tile; ``split`` (decode, needs G >= 64) decodes the ``[BLOCK_K/4, BLOCK_N]`` kept pairs once
and does one dot per position p; ``gemv`` (decode, M <= 2, on the CUDA cores) reads, per row and 32
columns, one metadata word and two code words, picks each kept code's column of x with selects and
applies the scales to the per-group sums. ``cusparselt`` (prefill, fp16) dequantizes the kept
codes to ``[N, K/2]`` values and multiplies on the sparse tensor cores (``sparse_tensor_cores``).
"""
import functools

import torch
import triton
import triton.language as tl

from ._common import (
    DECODE_MAX_M, KernelLimits, as_2d, cdiv, check_activation, empty_result, check_config, check_fold, DENSE_VARIANTS,
    dense_matmul, dot_tile, expand_into, finish_split_k, rows_arguments, grid_and_buffers, interpreting,
    k_range, load_x_tile, m_bucket, pick_config, pow2_divisor, store_result, store_rows, program_tile,
    expand_blocks, int4_word_fields, interleave4, int4_code_base, scaled_dot_rows, rows_accumulator, rows_result,
    spread_sorted_pairs, word_field_code, FLOAT_2_23_BITS, lane_halves,
)
from . import sparse_tensor_cores
from .int4_matmul import dequantize_into
from .sparse24_matmul import (
    group_positions, kept_slots, meta_fields_rows, sparse24_to_dense,
)


@triton.jit
def kept_codes(qv_ptr, stride_qn, grp, offs_n, mask):
    """The two kept codes ``(q0, q1)``, int32 -8..7 ``[len(grp), BLOCK_N]``, of groups ``grp``."""
    words = tl.load(qv_ptr + offs_n[None, :] * stride_qn + (grp // 4)[:, None], mask=mask, other=0)
    shift = ((grp % 4) * 8)[:, None]
    return ((words >> shift) & 0xF) - 8, ((words >> (shift + 4)) & 0xF) - 8


@triton.jit
def sparse24_int4_codes_tile(qv_ptr, meta_ptr, stride_qn, stride_mg, offs_k, offs_n, N):
    """Codes ``[BLOCK_K, BLOCK_N]`` (int32, 0 at pruned positions) of W^T."""
    mask = offs_n[None, :] < N
    first, second = kept_slots(meta_ptr, stride_mg, offs_k, offs_n, mask)
    q0, q1 = kept_codes(qv_ptr, stride_qn, offs_k // 4, offs_n, mask)
    return tl.where(first, q0, tl.where(second, q1, tl.zeros_like(q0)))


@triton.jit
def _sparse24_int4_tile_kernel(
    x_ptr, qv_ptr, meta_ptr, s_ptr, bias_ptr, y_ptr, ws_ptr, done_ptr,
    M, N, K, stride_xm, stride_qn, stride_mg, stride_sg, tiles_per_group,
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
        q = sparse24_int4_codes_tile(qv_ptr, meta_ptr, stride_qn, stride_mg, offs_k, offs_n, N)
        s = tl.load(s_ptr + (t // tiles_per_group) * stride_sg + offs_n, mask=offs_n < N, other=0.0)
        acc += dot_tile(a, q, UPCAST) * s.to(tl.float32)[None, :]
    store_result(acc, y_ptr, ws_ptr, done_ptr, bias_ptr, offs_m, offs_n, M, N, pid_k,
                 SPLIT_K, HAS_BIAS, REDUCE_IN_KERNEL)


@triton.jit
def _sparse24_int4_split_kernel(
    x_ptr, qv_ptr, meta_ptr, s_ptr, bias_ptr, y_ptr, ws_ptr, done_ptr,
    M, N, K, stride_xm, stride_qn, stride_mg, stride_sg, tiles_per_group,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, GROUP_M: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
    REDUCE_IN_KERNEL: tl.constexpr,
):
    pid_n = tl.program_id(0)  # decode: one row tile holds all of x
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_g = tl.arange(0, BLOCK_K // 4)
    mask = (offs_n < N)[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    start, end = k_range(pid_k, K // BLOCK_K, SPLIT_K)
    for t in range(start, end):
        grp = t * (BLOCK_K // 4) + offs_g
        i0, i1 = group_positions(meta_ptr, stride_mg, grp, offs_n, mask)
        q0, q1 = kept_codes(qv_ptr, stride_qn, grp, offs_n, mask)
        zero = tl.zeros_like(q0)
        part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for p in tl.static_range(4):
            a = load_x_tile(x_ptr, offs_m, grp * 4 + p, stride_xm, M, K)
            q = tl.where(i0 == p, q0, tl.where(i1 == p, q1, zero))
            part += dot_tile(a, q, UPCAST)
        s = tl.load(s_ptr + (t // tiles_per_group) * stride_sg + offs_n, mask=offs_n < N, other=0.0)
        acc += part * s.to(tl.float32)[None, :]
    store_result(acc, y_ptr, ws_ptr, done_ptr, bias_ptr, offs_m, offs_n, M, N, pid_k,
                 SPLIT_K, HAS_BIAS, REDUCE_IN_KERNEL)


# The decode spread (``rows`` at BLOCK_M <= 16) builds each dense position as a product of a kept
# code and a factor that is 0 or a power of two, on pairs of 16-bit floats. The codes are decoded
# scaled so that every product is ``q * unit``: in fp16 the first code of a group as 2q and the
# second as q * 2^-11, against factors 2^-11 (a lone bit 12) and 2 (a lone bit 14), unit 2^-10; in
# bf16 (and in the interpreter's float32 stand-in for it, which reads the same bits) q * 2^47 and
# q * 2^-49 against 2^-95 and 2, unit 2^-48. The bits OR-ed onto the codes per activation dtype:
SPREAD_CODE_BITS = {torch.float16: (0x68006800, 0x28002800), torch.bfloat16: (0x5A805A80, 0x2A802A80)}


@triton.jit
def _spread_lane_pair(codes, meta, first_bits, second_bits, dtype: tl.constexpr, UPCAST: tl.constexpr):
    """Dense positions 0-3 of two groups, one per 16-bit lane: ``codes`` holds each group's kept
    pair in bits 0-7 of its lane, ``meta`` its metadata ``i0 | i1 << 2`` in bits 11-14. Returns
    the 4 positions of the low lane's group, then the 4 of the high lane's (scaled, see above)."""
    if dtype == tl.float16:  # the second code read in place: bits 4-7 are mantissa bits in fp16
        q0l, q0h = lane_halves((codes & 0x000F000F) | first_bits, dtype, UPCAST)
        q1l, q1h = lane_halves((codes & 0x00F000F0) | second_bits, dtype, UPCAST)
        q0l, q0h = q0l - 2064.0, q0h - 2064.0  # 2048 + 2 nib - (2048 + 16) = 2q
        q1l, q1h = q1l - 0.03515625, q1h - 0.03515625  # 2^-5 + nib 2^-11 - (2^-5 + 2^-8)
    else:
        q0l, q0h = lane_halves((codes & 0x000F000F) | first_bits, dtype, UPCAST)
        q1l, q1h = lane_halves(((codes >> 4) & 0x000F000F) | second_bits, dtype, UPCAST)
        q0l, q0h = q0l - 19140298416324608.0, q0h - 19140298416324608.0  # 2^54 + 2^50
        q1l, q1h = q1l - 2.4158453015843406e-13, q1h - 2.4158453015843406e-13  # 2^-42 + 2^-46
    # Bits 11-14 of ``meta`` are a0 a1 b0 b1 (i0 = a0 + 2 a1, i1 = b0 + 2 b1); in ``up`` they sit
    # one bit higher, so a single AND/NOT puts each condition on bit 12 or bit 14. As i0 < i1:
    # i0 = 0 iff neither a bit, i0 = 1 iff a0, i0 = 2 iff a1; i1 = 1 iff not b1, 2 iff b1 and not
    # b0, 3 iff both.
    up = meta << 1
    f0_0, f0_0h = lane_halves(~(meta | up) & 0x10001000, dtype, UPCAST)
    f0_1, f0_1h = lane_halves(up & 0x10001000, dtype, UPCAST)
    f0_2, f0_2h = lane_halves(meta & 0x10001000, dtype, UPCAST)
    f1_1, f1_1h = lane_halves(~meta & 0x40004000, dtype, UPCAST)
    f1_2, f1_2h = lane_halves(meta & ~up & 0x40004000, dtype, UPCAST)
    f1_3, f1_3h = lane_halves(meta & up & 0x40004000, dtype, UPCAST)
    return (q0l * f0_0, q0l * f0_1 + q1l * f1_1, q0l * f0_2 + q1l * f1_2, q1l * f1_3,
            q0h * f0_0h, q0h * f0_1h + q1h * f1_1h, q0h * f0_2h + q1h * f1_2h, q1h * f1_3h)


@triton.jit
def _spread_word(words, meta16, first_bits, second_bits, dtype: tl.constexpr, UPCAST: tl.constexpr):
    """The 16 dense values of each code word's 4 groups (metadata in the low 16 bits of
    ``meta16``): groups 0 and 2 as one lane pair, then groups 1 and 3."""
    # One multiply moves the fields of groups j and j + 2 (bits 4j, 4j + 8) to bits 11 and 27.
    near = _spread_lane_pair(words, (meta16 & 0x0F0F) * 0x80800, first_bits, second_bits, dtype, UPCAST)
    far = _spread_lane_pair(words >> 8, (meta16 & 0xF0F0) * 0x8080, first_bits, second_bits, dtype, UPCAST)
    return near, far


@triton.jit
def _join_words(even_near, odd_near, even_far, odd_far, i: tl.constexpr):
    return tl.join(tl.join(even_near[i], odd_near[i]), tl.join(even_far[i], odd_far[i]))


@triton.jit
def spread_kept_codes(words, meta, first_bits, second_bits, dtype: tl.constexpr, UPCAST: tl.constexpr):
    """Dense tile ``[R, 16 W]`` (scaled, see ``SPREAD_CODE_BITS``) of code words ``[R, W]`` and
    metadata words ``[R, W / 2]``, its columns in the order of :func:`spread_column_order`: each
    pair of lanes stays in its 32-bit register, so the tile goes to the dot without repacking."""
    R: tl.constexpr = words.shape[0]
    W: tl.constexpr = words.shape[1]
    even, odd = tl.split(tl.reshape(words, (R, W // 2, 2)))
    even_near, even_far = _spread_word(even, meta, first_bits, second_bits, dtype, UPCAST)
    odd_near, odd_far = _spread_word(odd, meta >> 16, first_bits, second_bits, dtype, UPCAST)
    # Each join adds a dimension after the others: [R, W / 2, word parity, lane pair, p & 1, p >> 1, lane].
    low = tl.join(tl.join(_join_words(even_near, odd_near, even_far, odd_far, 0),
                          _join_words(even_near, odd_near, even_far, odd_far, 1)),
                  tl.join(_join_words(even_near, odd_near, even_far, odd_far, 2),
                          _join_words(even_near, odd_near, even_far, odd_far, 3)))
    high = tl.join(tl.join(_join_words(even_near, odd_near, even_far, odd_far, 4),
                           _join_words(even_near, odd_near, even_far, odd_far, 5)),
                   tl.join(_join_words(even_near, odd_near, even_far, odd_far, 6),
                           _join_words(even_near, odd_near, even_far, odd_far, 7)))
    return tl.reshape(tl.join(low, high), (R, 16 * W))


@triton.jit
def spread_column_order(BLOCK_K: tl.constexpr):
    """The column of K held at each column of :func:`spread_kept_codes`' tile: within each 32,
    tile column ``lane + 2 (p >> 1) + 4 (p & 1) + 8 j + 16 e`` holds position p of group
    ``4 e + j + 2 lane`` (e: the word, j: the lane pair)."""
    c = tl.arange(0, BLOCK_K)
    r = c % 32
    group = 4 * (r // 16) + (r // 8) % 2 + 2 * (r % 2)
    return c - r + 4 * group + (r // 4) % 2 + 2 * ((r // 2) % 2)


@triton.jit
def spread_code_words(words, field, dtype: tl.constexpr, UPCAST: tl.constexpr, BASE_LAST: tl.constexpr):
    """Dense code rows ``[R, 16W]`` (exact ``dtype`` values) from code words ``[R, W]`` and their
    groups' metadata fields ``[R, 4W]``: field 2i of a word is group i's first kept code, field
    2i + 1 its second, spread with selects (``spread_sorted_pairs``). ``BASE_LAST`` (see
    :func:`spread_base_last`): the codes are spread with their base (``int4_code_base``) and the
    tile's last operation removes it, one subtraction per value instead of one per code."""
    f0, f1, f2, f3, f4, f5, f6, f7 = int4_word_fields(words, dtype, UPCAST, BASE_LAST)
    q0 = interleave4(f0, f2, f4, f6)  # [R, 4W]
    q1 = interleave4(f1, f3, f5, f7)
    if BASE_LAST:
        return spread_sorted_pairs(q0, q1, field, int4_code_base(dtype)) - int4_code_base(dtype)
    return spread_sorted_pairs(q0, q1, field)


@triton.jit
def _sparse24_int4_rows_kernel(
    x_ptr, qv_ptr, meta_ptr, s_ptr, bias_ptr, y_ptr, ws_ptr, done_ptr,
    M, N, K, stride_xm, stride_qn, stride_mg, stride_sg, tiles_per_group, first_bits, second_bits,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, GROUP_M: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
    REDUCE_IN_KERNEL: tl.constexpr,
    FOLD_SCALES: tl.constexpr, W_LEFT: tl.constexpr, BASE_LAST: tl.constexpr,
):
    """Decode (``BLOCK_M <= 16``): the spread of :func:`spread_kept_codes`, with x's columns
    loaded in its order (few rows of x: cheaper to reorder than the weight tile) and rows past M
    repeating row M - 1 (not stored), so no mask. Prefill: the codes decoded per word and spread
    with selects (``spread_sorted_pairs``)."""
    offs_m, offs_n, pid_k = program_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_w = tl.arange(0, BLOCK_K // 16)
    row_mask = (offs_n < N)[:, None]
    DECODE: tl.constexpr = BLOCK_M <= 16
    if DECODE:
        x_rows = tl.minimum(offs_m, M - 1).to(tl.int64)
        x_ptrs = x_ptr + x_rows[:, None] * stride_xm + spread_column_order(BLOCK_K)[None, :]
        offs_mw = tl.arange(0, BLOCK_K // 32)
    acc = rows_accumulator(BLOCK_M, BLOCK_N, W_LEFT)
    start, end = k_range(pid_k, K // BLOCK_K, SPLIT_K)
    for t in range(start, end):
        words = tl.load(qv_ptr + offs_n[:, None] * stride_qn + (t * (BLOCK_K // 16) + offs_w)[None, :],
                        mask=row_mask, other=0)
        s = tl.load(s_ptr + (t // tiles_per_group) * stride_sg + offs_n, mask=offs_n < N, other=0.0)
        if DECODE:
            a = tl.load(x_ptrs + t * BLOCK_K)
            meta = tl.load(meta_ptr + (t * (BLOCK_K // 32) + offs_mw)[None, :] * stride_mg + offs_n[:, None],
                           mask=row_mask, other=0)
            q = spread_kept_codes(words, meta, first_bits, second_bits, a.dtype, UPCAST)
            if FOLD_SCALES:  # fp16: back to the codes (exactly), so that q * s rounds as the dense weight
                q = q * 1024.0
            else:
                s = s.to(tl.float32) * (1024.0 if a.dtype == tl.float16 else 281474976710656.0)  # 1 / unit
        else:
            a = load_x_tile(x_ptr, offs_m, t * BLOCK_K + tl.arange(0, BLOCK_K), stride_xm, M, K)
            field = meta_fields_rows(meta_ptr, stride_mg, offs_n, t, N, K, BLOCK_K)
            q = spread_code_words(words, field, a.dtype, UPCAST, BASE_LAST)
        acc = scaled_dot_rows(acc, a, q, s, FOLD_SCALES, UPCAST, W_LEFT)
    store_result(rows_result(acc, W_LEFT), y_ptr, ws_ptr, done_ptr, bias_ptr, offs_m, offs_n, M, N, pid_k,
                 SPLIT_K, HAS_BIAS, REDUCE_IN_KERNEL)


@triton.jit(do_not_specialize=["one"])
def _sparse24_int4_gemv_kernel(
    x_ptr, qv_ptr, meta_ptr, s_ptr, bias_ptr, y_ptr, ws_ptr, done_ptr,
    M, N, K, stride_xm, stride_qn, stride_mg, stride_sg, magic, one,
    GROUPSIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr,
    REDUCE_IN_KERNEL: tl.constexpr,
):
    """Decode on the CUDA cores, counted in instructions per kept code (the limit at M = 1).

    The K tile is read in sub-tiles of 32 columns (G is a multiple of 32: one scale per row):
    per row, one metadata word and two code words, each holding the kept pairs of 4 groups. The
    words ``[BLOCK_N, 2]``, their metadata halves and the rows' scales are loaded in one shape
    and one register layout, so no value of the loop goes through shared memory.

    Each code is read in place (``word_field_code``: an AND-OR and an FMA). A kept code takes
    its column of x with two selects on bits of the metadata: ``i0 < i1``, so the first code of a
    group is at position 0-2 and the second at 1-3. Per kept code: the AND-OR, the FMA, two bit
    tests, two selects, the multiply-add; x's columns are loaded once per thread for all of its
    rows."""
    pid_n = tl.program_id(0)  # decode: one row tile holds all of x
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # ``one`` (a run-time 1) hides from the compiler that the words are contiguous along K and the
    # metadata and scales along N: loaded one element at a time, all three take the same layout,
    # with many rows on each thread.
    offs_w = tl.arange(0, 2) * one
    rows = offs_n[None, :, None]
    row_mask = rows < N
    w_ptrs = qv_ptr + rows * stride_qn + offs_w[None, None, :]
    m_ptrs = meta_ptr + rows * one + 0 * offs_w[None, None, :]
    s_ptrs = s_ptr + rows * one + 0 * offs_w[None, None, :]
    m_shift = (offs_w * 16)[None, None, :]  # word j's metadata: bits 16j .. 16j + 15
    # Rows of x past M repeat row M - 1 (their sums are not stored): no mask on x's loads.
    x_rows = tl.minimum(offs_m, M - 1)
    x_ptrs = x_ptr + x_rows[:, None, None] * stride_xm + (offs_w * 16)[None, None, :]
    total = tl.zeros((BLOCK_M, BLOCK_N, 2), dtype=tl.float32)
    start, end = k_range(pid_k, tl.cdiv(K, BLOCK_K), SPLIT_K)
    for t in range(start, end):
        for sub in tl.static_range(BLOCK_K // 32):
            col = t * BLOCK_K + sub * 32
            inside = (col < K) | EVEN_K  # K is a multiple of 32: a sub-tile lies inside or past K
            mask = (row_mask | EVEN_N) & inside
            words = tl.load(w_ptrs + col // 16, mask=mask, other=0)
            high = words >> 12
            meta = tl.load(m_ptrs + (col // 32) * stride_mg, mask=mask, other=0) >> m_shift
            s = tl.load(s_ptrs + (col // GROUPSIZE) * stride_sg, mask=mask, other=0.0)
            part = tl.zeros((BLOCK_M, BLOCK_N, 2), dtype=tl.float32)
            for g in tl.static_range(4):
                x0 = tl.load(x_ptrs + col + 4 * g, mask=inside, other=0.0).to(tl.float32)
                x1 = tl.load(x_ptrs + col + 4 * g + 1, mask=inside, other=0.0).to(tl.float32)
                x2 = tl.load(x_ptrs + col + 4 * g + 2, mask=inside, other=0.0).to(tl.float32)
                x3 = tl.load(x_ptrs + col + 4 * g + 3, mask=inside, other=0.0).to(tl.float32)
                for h in tl.static_range(2):  # the group's first (h = 0) and second kept code
                    code = word_field_code(words, high, magic, 2 * g + h)
                    low_bit = (meta & (1 << (4 * g + 2 * h))) != 0
                    high_bit = (meta & (2 << (4 * g + 2 * h))) != 0
                    if h == 0:
                        xs = tl.where(high_bit, x2, tl.where(low_bit, x1, x0))
                    else:
                        xs = tl.where(high_bit, tl.where(low_bit, x3, x2), x1)
                    part += code * xs
            total += part * s.to(tl.float32)
    # Reduced over the two words once, after the loop.
    acc = tl.sum(total, axis=2)
    store_result(acc, y_ptr, ws_ptr, done_ptr, bias_ptr, offs_m, offs_n, M, N, pid_k,
                 SPLIT_K, HAS_BIAS, REDUCE_IN_KERNEL)


def spread_base_last(cfg) -> bool:
    """Whether the "rows" kernel with ``cfg`` removes the codes' base last (``BASE_LAST`` of
    :func:`spread_code_words`). Needed where the exact-scale tile goes to shared memory as the
    right operand and each thread holds one whole row of it (``BLOCK_N = 32 num_warps``) with
    ``BLOCK_K <= 64``: with no other elementwise operation between the spread's reshape and the
    dot, Triton (3.6 and 3.8) folds the reshape into the shared-memory layout of the operand and
    fails to compile ("Illegal shared layout"; every tile seen to fail has these traits, and
    ``aot_check --all`` compiles every tuner candidate). Elsewhere the subtraction stays on the
    codes, where it is cheaper (4-7 % fewer instructions per iteration)."""
    return (cfg.block_m > DECODE_MAX_M and not cfg.weight_left and not cfg.fold_scales and cfg.block_k <= 64
            and cfg.block_n == 32 * cfg.num_warps)


_KERNELS = {"tile": _sparse24_int4_tile_kernel, "split": _sparse24_int4_split_kernel,
            "rows": _sparse24_int4_rows_kernel}


@triton.jit
def _sparse24_int4_dequant_kernel(
    qv_ptr, meta_ptr, s_ptr, out_ptr, N, K, stride_qn, stride_mg, stride_sg, GROUPSIZE,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Rows of the dense weight, decoded as the prefill rows kernel does (``spread_code_words``,
    exact in fp16), ``q * s`` in fp32 with one scale per row (``BLOCK_K`` divides G)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    t = tl.program_id(1)
    offs_w = t * (BLOCK_K // 16) + tl.arange(0, BLOCK_K // 16)
    words = tl.load(qv_ptr + offs_n[:, None] * stride_qn + offs_w[None, :], mask=(offs_n < N)[:, None], other=0)
    field = meta_fields_rows(meta_ptr, stride_mg, offs_n, t, N, K, BLOCK_K)
    s = tl.load(s_ptr + (t * BLOCK_K // GROUPSIZE) * stride_sg + offs_n, mask=offs_n < N, other=0.0)
    w = spread_code_words(words, field, tl.float16, False, False).to(tl.float32) * s.to(tl.float32)[:, None]
    store_rows(out_ptr, w, offs_n, t * BLOCK_K + tl.arange(0, BLOCK_K), N, K)


def _check_packed(qvalues, meta, scales, groupsize):
    if qvalues.dtype != torch.int32 or meta.dtype != torch.int32 or qvalues.dim() != 2:
        raise TypeError("2:4-int4 expects int32 qvalues [N, K/16] and int32 meta [K/32, N]")
    n, k = qvalues.shape[0], qvalues.shape[1] * 16
    if tuple(meta.shape) != (k // 32, n):
        raise ValueError(f"meta must have shape [K/32, N] = {(k // 32, n)}, got {tuple(meta.shape)}")
    if groupsize <= 0 or k % groupsize or groupsize % 32:
        raise ValueError(f"groupsize={groupsize} must be a positive multiple of 32 dividing K={k}")
    if tuple(scales.shape) != (k // groupsize, n):
        raise ValueError(f"scales must have shape [K/G, N] = {(k // groupsize, n)}, got {tuple(scales.shape)}")
    return n, k


@functools.lru_cache(maxsize=None)  # one per group size: a launch asks for it
def sparse24_int4_limits(groupsize: int) -> KernelLimits:
    # gemv: tall row tiles share each column of x among many rows of a thread (1024 rows spill
    # registers at M = 2, and with BLOCK_K = 256 at M = 1; 256 saves nothing on 512 or fewer
    # rows); above M = 2 the tensor-core kernels take fewer instructions.
    return KernelLimits(block_k_max=pow2_divisor(groupsize, 256), split_block_k=64, scaled=True, sparse24=True,
                        gemv_block_n=(512, 1024, 256), gemv_block_k=(128,), gemv_max_m=2)


def sparse24_int4_dequantize(qvalues, meta, scales, groupsize: int, dtype=torch.float16):
    """Dense ``[N, K]`` weight in ``dtype`` (``q * s`` in fp32, then rounded)."""
    n, k = _check_packed(qvalues, meta, scales, groupsize)
    out = torch.empty((n, k), dtype=dtype, device=qvalues.device)
    return expand_into(out, lambda target: _dequantize(target, qvalues, meta, scales, groupsize))


def _dequantize(out, qvalues, meta, scales, groupsize: int):
    """Launch the expand kernel: the dense rows of the packed rows given (``meta`` and ``scales``
    with any row stride) into the contiguous ``out``."""
    n, k = out.shape
    bn, bk = expand_blocks()
    bk = pow2_divisor(groupsize, bk)  # one scale per row of a tile (G is a multiple of 32)
    _sparse24_int4_dequant_kernel[(cdiv(n, bn), k // bk)](
        qvalues, meta, scales, out, n, k, qvalues.stride(0), meta.stride(0), scales.stride(0), groupsize,
        BLOCK_N=bn, BLOCK_K=bk,
    )


def dequantize_kept_into(out, qvalues, scales, groupsize: int):
    """Write the kept values ``q * s`` ``[N, K/2]`` into ``out``: the kept codes are an INT4 matrix
    of the same nibble order whose scale groups hold G/2 codes."""
    expand_into(out, lambda target: dequantize_into(target, qvalues, scales, groupsize // 2))


def sparse24_int4_matmul(x, qvalues, meta, scales, groupsize: int, bias=None, *, config=None):
    """``x [..., K]`` (fp16/bf16) times the packed 2:4+INT4 weight, transposed: ``[..., N]``."""
    n, k = _check_packed(qvalues, meta, scales, groupsize)
    check_activation(x, k, "sparse24_int4_matmul")
    x2 = as_2d(x)
    m = x2.shape[0]
    if m == 0:
        return empty_result(x, n)
    qvalues, meta, scales = qvalues.contiguous(), meta.contiguous(), scales.contiguous()
    limits = sparse24_int4_limits(groupsize)

    def launch(cfg):
        check_config(cfg, limits, m)
        check_fold(cfg, x2.dtype)
        if cfg.variant in DENSE_VARIANTS:
            return dense_matmul(cfg, x2, n, lambda out, n0, n1: _dequantize(
                out, qvalues[n0:n1], meta[:, n0:n1], scales[:, n0:n1], groupsize), bias)
        if cfg.variant == sparse_tensor_cores.VARIANT:
            return sparse_tensor_cores.sparse_matmul(
                x2, meta, n, k, lambda out: dequantize_kept_into(out, qvalues, scales, groupsize),
                sparse24_to_dense, bias,
            )
        grid, y, ws, done = grid_and_buffers(x2, n, cfg, qvalues)
        if cfg.variant == "gemv":
            _sparse24_int4_gemv_kernel[grid](
                x2, qvalues, meta, scales, bias if bias is not None else y, y, ws, done,
                m, n, k, x2.stride(0), qvalues.stride(0), meta.stride(0), scales.stride(0), FLOAT_2_23_BITS, 1,
                GROUPSIZE=groupsize, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                SPLIT_K=cfg.split_k, HAS_BIAS=bias is not None, EVEN_K=k % cfg.block_k == 0,
                REDUCE_IN_KERNEL=done is not None,
                EVEN_N=n % cfg.block_n == 0, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            )
            return finish_split_k(ws, y, bias, cfg, x2.dtype, done)
        rows = {"BASE_LAST": spread_base_last(cfg)} if cfg.variant == "rows" else {}
        spread_bits = SPREAD_CODE_BITS[x2.dtype] if cfg.variant == "rows" else ()
        _KERNELS[cfg.variant][grid](
            x2, qvalues, meta, scales, bias if bias is not None else y, y, ws, done,
            m, n, k, x2.stride(0), qvalues.stride(0), meta.stride(0), scales.stride(0),
            groupsize // cfg.block_k, *spread_bits,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT_K=cfg.split_k,
            REDUCE_IN_KERNEL=done is not None,
            GROUP_M=cfg.group_m, HAS_BIAS=bias is not None, UPCAST=interpreting(),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **rows_arguments(cfg, limits), **rows,
        )
        return finish_split_k(ws, y, bias, cfg, x2.dtype, done)

    if config is None:
        key = ("2:4-int4", m_bucket(m), n, k, groupsize, x2.dtype, x2.device)
        config = pick_config(key, m, n, k, limits, x2.device, launch, allow_dense=x2.dtype == torch.float16)
    return launch(config).reshape(*x.shape[:-1], n)
