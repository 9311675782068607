"""4-bit fields packed into int32 words, the storage unit shared by every packed layout.

Eight 4-bit fields per word along the last dimension: field ``i`` of word ``j`` holds element
``8*j + i`` and occupies bits ``4*i .. 4*i+3`` (element 0 in the least significant bits). Words are
stored as int32 (two's complement), so a word whose field 7 is >= 8 is negative; only the bit
pattern matters.
"""
import torch

FIELDS_PER_WORD = 8
_SHIFTS = torch.arange(FIELDS_PER_WORD, dtype=torch.int64) * 4


def pack_nibbles(fields: torch.Tensor) -> torch.Tensor:
    """``[..., L]`` integers in ``0..15`` (``L % 8 == 0``) -> int32 ``[..., L/8]``."""
    length = fields.shape[-1]
    if length % FIELDS_PER_WORD:
        raise ValueError(f"cannot pack {length} 4-bit fields: the count must be a multiple of 8")
    f = fields.to(torch.int64)
    if f.numel() and (int(f.min()) < 0 or int(f.max()) > 15):
        raise ValueError(f"4-bit fields must lie in 0..15, got {int(f.min())}..{int(f.max())}")
    f = f.reshape(*f.shape[:-1], length // FIELDS_PER_WORD, FIELDS_PER_WORD)
    words = (f << _SHIFTS.to(f.device)).sum(dim=-1)
    # Values >= 2**31 wrap to the negative int32 with the same bit pattern.
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


def unpack_nibbles(words: torch.Tensor) -> torch.Tensor:
    """int32 ``[..., W]`` -> int64 ``[..., 8*W]`` fields in ``0..15`` (inverse of ``pack_nibbles``)."""
    if words.dtype != torch.int32:
        raise TypeError(f"packed words must be int32, got {words.dtype}")
    w = words.to(torch.int64) & 0xFFFFFFFF
    fields = (w.unsqueeze(-1) >> _SHIFTS.to(w.device)) & 0xF
    return fields.reshape(*words.shape[:-1], words.shape[-1] * FIELDS_PER_WORD)
