"""The 2:4 + INT4 layout: 2:4 sparsity whose kept values are INT4 codes.

A weight ``W = scale * q`` ``[N, K]`` (``K % 32 == 0``) whose codes ``q`` (-8..7) have at most 2
nonzeros in every group of 4 consecutive input columns, with int4_grid scales (one per row per G
dense input columns), is stored as:

* ``qvalues``: ``[N, K/16]`` int32: the ``[N, K/2]`` kept codes (2 per group of 4, ordered as in
  the 2:4 layout) packed 8 per word along K, offset binary ``q + 8``. The kept pair of group
  ``g`` is fields ``2*(g%4)`` and ``2*(g%4)+1`` of ``qvalues[n, g // 4]``.
* ``meta``: ``[K/32, N]`` int32, the 2:4 metadata exactly as in ``pyprune.formats.sparse24``
  (field ``g % 8`` of ``meta[g // 8, n]`` is ``i0 | (i1 << 2)``).
* ``scales``: ``[K/G, N]`` float16, group-major, exactly as in ``pyprune.formats.int4`` (groups
  count dense columns, so a scale covers G/2 stored codes).

Size: 2 bits (codes) + 1 bit (metadata) per weight + 16 bits per G weights (3.125 bits for G=128,
0.195x of fp16). The round trip of codes and scales is exact.
"""
from dataclasses import dataclass

import torch

from pyprune.formats.base import PackedWeight, check_matrix, expect_tensor
from pyprune.formats.int4 import check_codes, check_scales, dequantize_codes, resolve_groupsize, rtn_codes
from pyprune.formats.nibbles import pack_nibbles, unpack_nibbles
from pyprune.formats.sparse24 import (
    check_2of4, check_meta, gather_kept, kept_positions, pack_meta, scatter_kept, unpack_meta,
)


@dataclass
class Sparse24Int4Weight(PackedWeight):
    qvalues: torch.Tensor  # [N, K/16] int32, offset-binary kept codes
    meta: torch.Tensor  # [K/32, N] int32
    scales: torch.Tensor  # [K/G, N] float16
    shape: tuple  # (N, K)
    groupsize: int  # effective G

    kind = "2:4-int4"
    tensor_names = ("qvalues", "meta", "scales")

    def _static_fields(self):
        return {"shape": self.shape, "groupsize": self.groupsize}

    def unpack(self) -> tuple:
        """(codes int8 ``[N, K]`` with zeros at the pruned positions, scales float32 ``[N, K/G]``)."""
        kept = unpack_nibbles(self.qvalues).view(torch.int8) - 8
        i0, i1 = unpack_meta(self.meta)
        return scatter_kept(kept, i0, i1), self.scales.float().t().contiguous()

    def dense(self, dtype=torch.float32) -> torch.Tensor:
        codes, scales = self.unpack()
        return dequantize_codes(codes, scales, self.groupsize).to(dtype)

    def layout(self) -> dict:
        return {"kind": self.kind, "shape": list(self.shape), "groupsize": self.groupsize}

    def validate(self):
        n, k = self.shape
        expect_tensor(self.qvalues, (n, k // 16), (torch.int32,), "qvalues")
        expect_tensor(self.meta, (k // 32, n), (torch.int32,), "meta")
        check_meta(self.meta)
        expect_tensor(self.scales, (k // self.groupsize, n), (torch.float16,), "scales")


def pack_sparse24_int4(codes: torch.Tensor, scales: torch.Tensor, groupsize: int) -> Sparse24Int4Weight:
    """Pack 2:4-sparse integer codes ``[N, K]`` (-8..7, at most 2 nonzeros per group of 4) and
    scales ``[N, K/G]``. Raises PatternError naming the first offending group or entry."""
    n, k = check_matrix(codes, "codes")
    g = resolve_groupsize(groupsize, k)
    check_codes(codes)
    check_scales(scales, n, k // g)
    c = codes.to(torch.int64)
    nonzero = c != 0
    check_2of4(nonzero, "codes")
    i0, i1 = kept_positions(nonzero)
    kept = gather_kept(c, i0, i1)
    return Sparse24Int4Weight(
        qvalues=pack_nibbles(kept + 8),
        meta=pack_meta(i0, i1),
        scales=scales.to(torch.float16).t().contiguous(),
        shape=(n, k),
        groupsize=g,
    )


def quantize_sparse24_int4(weight: torch.Tensor, groupsize: int = 128) -> Sparse24Int4Weight:
    """RTN-quantize a 2:4-sparse float weight on the int4_grid (zeros stay zero) and pack it."""
    check_matrix(weight)
    check_2of4(weight != 0)
    codes, scales = rtn_codes(weight, groupsize)
    return pack_sparse24_int4(codes, scales, groupsize)
