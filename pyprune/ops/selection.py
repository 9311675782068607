"""Selecting the lowest scores: the mask rule every pruning solver shares.

``select_lowest(score, mode, k, n, m)`` returns a bool mask (True = pruned) with exactly the
requested count, ties broken by position (the lowest index is pruned first):

    MODE_LAYER  the ``k`` lowest scores of the whole matrix
    MODE_ROW    the ``k`` lowest scores of every row
    MODE_NM     the ``m - n`` lowest of every group of ``m`` consecutive columns of a row

Memory is bounded: rows are processed in chunks of about ``CHUNK_ELEMENTS`` scores, so the
temporaries do not grow with the matrix (a ``topk`` over a flattened 8640 x 3200 matrix costs
several times the matrix). The whole-matrix threshold is found by a two-pass radix select on the
float bits (a 65536-bin histogram of the high 16 bits, then of the low 16 bits inside the
crossing bin). Scores may be any floating dtype; they are compared as float32. NaN scores are
refused.
"""
import torch

MODE_LAYER, MODE_ROW, MODE_NM = 0, 1, 2
CHUNK_ELEMENTS = 1 << 20
_BINS = 1 << 16


def select_lowest(score: torch.Tensor, mode: int, k: int = 0, n: int = 0, m: int = 0) -> torch.Tensor:
    """Bool mask of the lowest scores (see the module docstring)."""
    if score.dim() != 2:
        raise ValueError(f"scores must be a matrix [rows, cols], got shape {tuple(score.shape)}")
    pruned = torch.zeros(score.shape, dtype=torch.bool, device=score.device)
    if mode == MODE_NM:
        _select_nm(score, pruned, n, m)
    elif mode == MODE_ROW:
        if k:
            _select_per_row(score, pruned, k)
    elif mode == MODE_LAYER:
        if k:
            _select_whole(score, pruned, k)
    else:
        raise ValueError(f"unknown selection mode {mode}; expected {MODE_LAYER}, {MODE_ROW} or {MODE_NM}")
    return pruned


def _row_chunks(score: torch.Tensor):
    rows, cols = score.shape
    step = max(1, CHUNK_ELEMENTS // max(cols, 1))
    for start in range(0, rows, step):
        yield start, min(start + step, rows)


def _as_float(chunk: torch.Tensor) -> torch.Tensor:
    chunk = chunk.float() + 0.0  # -0.0 becomes +0.0, so equal floats have equal bits
    if torch.isnan(chunk).any():
        raise ValueError("pruning scores contain NaN (the weights or the calibration statistics are not finite)")
    return chunk


def _select_nm(score, pruned, n, m):
    rows, cols = score.shape
    for start, end in _row_chunks(score):
        groups = _as_float(score[start:end]).reshape(end - start, cols // m, m)
        # A stable sort puts equal scores in column order, so the lower position is pruned first.
        drop = torch.sort(groups, dim=2, stable=True).indices[..., : m - n]
        pruned[start:end].view(end - start, cols // m, m).scatter_(2, drop, True)


def _select_per_row(score, pruned, k):
    for start, end in _row_chunks(score):
        chunk = _as_float(score[start:end])
        kth = torch.kthvalue(chunk, k, dim=1, keepdim=True).values
        below = chunk < kth
        tied = chunk == kth
        missing = k - below.sum(1, keepdim=True)
        if not bool((tied.sum(1, keepdim=True) == missing).all()):  # surplus ties: lowest positions first
            tied &= torch.cumsum(tied, dim=1) <= missing
        pruned[start:end] = below | tied


def _sortable_keys(chunk: torch.Tensor) -> torch.Tensor:
    """int64 keys in [0, 2^32) that order like the float32 values of ``chunk``."""
    bits = chunk.contiguous().view(torch.int32).to(torch.int64)
    # Negative floats order backwards by their bits: flip the magnitude bits, keep them below 0.
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return bits + (1 << 31)


def _select_whole(score, pruned, k):
    # Pass 1: which high-16-bit bin holds the k-th smallest key.
    high = torch.zeros(_BINS, dtype=torch.int64, device=score.device)
    for start, end in _row_chunks(score):
        high += torch.bincount((_sortable_keys(_as_float(score[start:end])) >> 16).flatten(), minlength=_BINS)
    cum = torch.cumsum(high, 0)
    b = int(torch.searchsorted(cum, k))
    below_bin = int(cum[b - 1]) if b else 0
    # Pass 2: the low 16 bits inside that bin give the exact threshold key.
    low = torch.zeros(_BINS, dtype=torch.int64, device=score.device)
    for start, end in _row_chunks(score):
        keys = _sortable_keys(_as_float(score[start:end]))
        low += torch.bincount(keys[(keys >> 16) == b] & 0xFFFF, minlength=_BINS)
    cum = torch.cumsum(low, 0)
    lo = int(torch.searchsorted(cum, k - below_bin))
    threshold = (b << 16) | lo
    ties_needed = k - below_bin - (int(cum[lo - 1]) if lo else 0)
    # Pass 3: everything below the threshold, then the tied keys in position order.
    for start, end in _row_chunks(score):
        keys = _sortable_keys(_as_float(score[start:end]))
        chunk_mask = keys < threshold
        if ties_needed:
            tied = keys == threshold
            count = int(tied.sum())
            if count > ties_needed:
                tied &= (torch.cumsum(tied.flatten(), 0) <= ties_needed).view(tied.shape)
                count = ties_needed
            chunk_mask |= tied
            ties_needed -= count
        pruned[start:end] = chunk_mask
