"""4-bit fields packed into int32 words, the storage unit shared by every packed layout.

Eight 4-bit fields per word along the last dimension: field ``i`` of word ``j`` holds element
``8*j + i`` and occupies bits ``4*i .. 4*i+3`` (element 0 in the least significant bits). Words are
stored as int32 (two's complement), so a word whose field 7 is >= 8 is negative; only the bit
pattern matters.

On a little-endian host (the layout is defined on the int32 value, not on bytes) byte ``b`` of a
word holds fields ``2b`` (low nibble) and ``2b+1`` (high nibble), so packing and unpacking work
on uint8 views: one byte per two fields instead of int64 arithmetic per field.
"""
import sys

import torch

FIELDS_PER_WORD = 8
_LITTLE_ENDIAN = sys.byteorder == "little"


def pack_nibbles(fields: torch.Tensor) -> torch.Tensor:
    """``[..., L]`` integers in ``0..15`` (``L % 8 == 0``) -> int32 ``[..., L/8]``."""
    length = fields.shape[-1]
    if length % FIELDS_PER_WORD:
        raise ValueError(f"cannot pack {length} 4-bit fields: the count must be a multiple of 8")
    if fields.numel() and (int(fields.min()) < 0 or int(fields.max()) > 15):
        raise ValueError(f"4-bit fields must lie in 0..15, got {int(fields.min())}..{int(fields.max())}")
    if not _LITTLE_ENDIAN:  # pragma: no cover - no big-endian host runs pyprune today
        f = fields.to(torch.int64).reshape(*fields.shape[:-1], length // 8, 8)
        words = (f << (torch.arange(8, device=f.device) * 4)).sum(-1)
        return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    f = fields.to(torch.uint8).reshape(*fields.shape[:-1], length // 2, 2)
    packed = (f[..., 0] | (f[..., 1] << 4)).contiguous()
    return packed.view(torch.int32)


def unpack_nibbles(words: torch.Tensor) -> torch.Tensor:
    """int32 ``[..., W]`` -> uint8 ``[..., 8*W]`` fields in ``0..15`` (inverse of ``pack_nibbles``)."""
    if words.dtype != torch.int32:
        raise TypeError(f"packed words must be int32, got {words.dtype}")
    if not _LITTLE_ENDIAN:  # pragma: no cover
        w = words.to(torch.int64) & 0xFFFFFFFF
        f = (w.unsqueeze(-1) >> (torch.arange(8, device=w.device) * 4)) & 0xF
        return f.reshape(*words.shape[:-1], words.shape[-1] * 8).to(torch.uint8)
    b = words.contiguous().view(torch.uint8)
    return torch.stack((b & 0xF, b >> 4), dim=-1).reshape(*words.shape[:-1], words.shape[-1] * FIELDS_PER_WORD)
