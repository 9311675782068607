"""The INT4 layout: the grid of ``pyprune.ops.int4_grid`` stored exactly.

A weight ``W = scale * q`` of shape ``[N, K]`` (``K % 32 == 0``), integer codes ``q`` in -8..7 and
one scale per output row per group of ``G`` consecutive input columns (``G`` = the group size,
``K`` for per-channel), is stored as:

* ``qweight``: ``[N, K/8]`` int32. Field ``i`` (bits ``4i .. 4i+3``) of ``qweight[n, j]`` holds
  the code of column ``8j + i`` in offset binary, ``q + 8`` (0..15), so decoding is
  ``((word >> 4i) & 15) - 8``.
* ``scales``: ``[K/G, N]`` float16, group-major (the transpose of int4_grid's ``[rows, ngroups]``)
  so that the scales of consecutive output rows are contiguous in memory. int4_grid rounds every
  scale to float16 when fitting, so float16 holds it exactly.

Size: 4 bits per weight + 16 bits per G weights (4.125 bits for G=128, 0.258x of fp16). The
round trip ``unpack(pack(q, s)) == (q, s)`` is exact and ``dense()`` (``q * s`` in float32) is
exact too (a 4-bit integer times an 11-bit mantissa fits float32).
"""
from dataclasses import dataclass

import torch

from pyprune.formats.base import PackedWeight, PatternError, check_matrix, expect_tensor
from pyprune.formats.nibbles import pack_nibbles, unpack_nibbles
from pyprune.ops import int4_grid


def resolve_groupsize(groupsize: int, in_features: int) -> int:
    """int4_grid's check, plus the packed layouts' own need: G a multiple of 32 (it divides K)."""
    g = int4_grid.check_groupsize(int(groupsize), in_features)
    if g % 32:
        raise ValueError(f"effective group size {g} must be a multiple of 32 for the packed INT4 layouts")
    return g


def rtn_codes(weight: torch.Tensor, groupsize: int) -> tuple:
    """Round-to-nearest on the int4_grid: ``weight [N, K]`` -> (codes int8 ``[N, K]``,
    scales float32 ``[N, K/G]``), scales fitted per group by int4_grid (absmax/7, fp16-exact)."""
    n, k = check_matrix(weight)
    g = resolve_groupsize(groupsize, k)
    groups = weight.float().reshape(n * (k // g), g)
    scale = int4_grid.fit_scale(groups)
    codes = int4_grid.quantize(groups, scale)
    return codes.reshape(n, k).to(torch.int8), scale.reshape(n, k // g)


def codes_on_grid(weight: torch.Tensor, scales: torch.Tensor, groupsize: int) -> torch.Tensor:
    """Recover the codes of a weight that already lies on the INT4 grid of ``scales`` ([N, K/G]).

    The weight must equal ``q * s`` rounded to its own dtype (how a quantized dense weight is
    stored); otherwise PatternError names the first group that is off the grid."""
    n, k = check_matrix(weight)
    g = resolve_groupsize(groupsize, k)
    s = scales.float().to(weight.device)
    check_scales(s, n, k // g)
    s_full = s.repeat_interleave(g, dim=1)
    codes = torch.round(weight.float() / s_full)
    off = (codes < int4_grid.QMIN) | (codes > int4_grid.QMAX)
    off |= (codes * s_full).to(weight.dtype) != weight
    if bool(off.any()):
        row, col = (int(v) for v in torch.nonzero(off)[0])
        raise PatternError(
            f"weight is not on the INT4 grid of the given scales: row {row}, group {col // g} "
            f"(column {col}: value {float(weight[row, col])}, scale {float(s[row, col // g])})"
        )
    return codes.to(torch.int8)


def dequantize_codes(codes: torch.Tensor, scales: torch.Tensor, groupsize: int) -> torch.Tensor:
    """``q * s`` as float32 ``[N, K]`` (exact) from codes ``[N, K]`` and scales ``[N, K/G]``."""
    n, k = codes.shape
    grouped = codes.reshape(n, k // groupsize, groupsize).float()
    return (grouped * scales.float().unsqueeze(-1)).reshape(n, k)


def check_codes(codes: torch.Tensor, what: str = "codes"):
    c = codes.float() if codes.is_floating_point() else codes.to(torch.int64)
    bad = (c < int4_grid.QMIN) | (c > int4_grid.QMAX)
    if codes.is_floating_point():
        bad |= c != torch.round(c)
    if bool(bad.any()):
        row, col = (int(v) for v in torch.nonzero(bad)[0])
        raise PatternError(
            f"INT4 {what} must be integers in {int4_grid.QMIN}..{int4_grid.QMAX}: "
            f"row {row}, column {col} holds {float(codes[row, col])}"
        )


def check_scales(scales: torch.Tensor, rows: int, ngroups: int):
    if tuple(scales.shape) != (rows, ngroups):
        raise ValueError(f"scales must have shape [out_features, groups] = {(rows, ngroups)}, got {tuple(scales.shape)}")
    s = scales.float()
    bad = ~torch.isfinite(s) | (s == 0) | (s.to(torch.float16).float() != s)
    if bool(bad.any()):
        row, grp = (int(v) for v in torch.nonzero(bad)[0])
        raise PatternError(
            f"INT4 scales must be nonzero, finite and exactly representable in float16: "
            f"row {row}, group {grp} holds {float(s[row, grp])!r}"
        )


@dataclass
class Int4Weight(PackedWeight):
    qweight: torch.Tensor  # [N, K/8] int32, offset-binary codes
    scales: torch.Tensor  # [K/G, N] float16
    shape: tuple  # (N, K)
    groupsize: int  # effective G (K for per-channel)

    kind = "int4"
    tensor_names = ("qweight", "scales")

    def _static_fields(self):
        return {"shape": self.shape, "groupsize": self.groupsize}

    def unpack(self) -> tuple:
        """(codes int8 ``[N, K]``, scales float32 ``[N, K/G]``), exactly what was packed."""
        codes = (unpack_nibbles(self.qweight).view(torch.int8) - 8)
        return codes, self.scales.float().t().contiguous()

    def dense(self, dtype=torch.float32) -> torch.Tensor:
        """``q * s`` ``[N, K]`` computed exactly in float32, then cast to ``dtype``."""
        codes, scales = self.unpack()
        return dequantize_codes(codes, scales, self.groupsize).to(dtype)

    def layout(self) -> dict:
        return {"kind": self.kind, "shape": list(self.shape), "groupsize": self.groupsize}

    def validate(self):
        n, k = self.shape
        expect_tensor(self.qweight, (n, k // 8), (torch.int32,), "qweight")
        expect_tensor(self.scales, (k // self.groupsize, n), (torch.float16,), "scales")


def pack_int4(codes: torch.Tensor, scales: torch.Tensor, groupsize: int) -> Int4Weight:
    """Pack integer codes ``[N, K]`` (any int or float dtype holding integers in -8..7) and
    scales ``[N, K/G]`` (int4_grid's layout; fp16-exact). Bad codes/scales raise PatternError
    naming the first offending entry."""
    n, k = check_matrix(codes, "codes")
    g = resolve_groupsize(groupsize, k)
    check_codes(codes)
    check_scales(scales, n, k // g)
    qweight = pack_nibbles(codes.to(torch.int16) + 8)
    return Int4Weight(
        qweight=qweight, scales=scales.to(torch.float16).t().contiguous(), shape=(n, k), groupsize=g
    )


def quantize_int4(weight: torch.Tensor, groupsize: int = 128) -> Int4Weight:
    """RTN-quantize a float weight on the int4_grid and pack it."""
    codes, scales = rtn_codes(weight, groupsize)
    return pack_int4(codes, scales, groupsize)
