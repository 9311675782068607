"""The 2:4 semi-structured sparse layout.

A weight ``W`` of shape ``[N, K]`` (``K % 32 == 0``) in which every group of 4 consecutive input
columns of a row (columns ``4g .. 4g+3``) holds at most 2 nonzeros is stored as:

* ``values``: ``[N, K/2]``, float16/bfloat16 (float32 accepted for the reference path only). For
  group ``g`` of row ``n``, ``values[n, 2g]`` and ``values[n, 2g+1]`` are the entries kept at
  positions ``i0 < i1`` of the group. A group with fewer than 2 nonzeros keeps its nonzeros and
  pads with the lowest free positions, storing 0 there.
* ``meta``: ``[K/32, N]`` int32, transposed so that the metadata of consecutive output rows is
  contiguous (one coalesced load per tile in the kernels). Group ``g`` of row ``n`` is the 4-bit
  field ``g % 8`` (bits ``4*(g%8) .. 4*(g%8)+3``) of ``meta[g // 8, n]``; the field is
  ``i0 | (i1 << 2)``: two 2-bit positions, one per kept value, always ``i0 < i1`` (checked when a
  checkpoint is loaded: the kernels rely on it).

Size: 16 bits x K/2 values + 4 bits per group = 9 bits per weight in fp16 (0.5625x of fp16).
``unpack(pack(W)) == W`` exactly when ``W`` is already in the value dtype.
"""
from dataclasses import dataclass

import torch

from pyprune.formats.base import VALUE_DTYPES, PackedWeight, PatternError, check_matrix, expect_tensor
from pyprune.formats.nibbles import pack_nibbles, unpack_nibbles


def check_2of4(nonzero: torch.Tensor, what: str = "weight"):
    """Raise PatternError naming the first group of 4 with more than 2 nonzeros.

    ``nonzero``: bool ``[N, K]``."""
    n, k = nonzero.shape
    counts = nonzero.reshape(n, k // 4, 4).sum(dim=-1)
    bad = counts > 2
    if bool(bad.any()):
        flat = int(torch.nonzero(bad.flatten())[0])
        row, group = divmod(flat, k // 4)
        raise PatternError(
            f"{what} is not 2:4 sparse: row {row}, columns {4 * group}..{4 * group + 3} hold "
            f"{int(counts[row, group])} nonzeros ({int(bad.sum())} offending groups in all); 2:4 keeps at most 2 of every 4"
        )


def _pair_table() -> torch.Tensor:
    """For each 4-bit nonzero mask of a group (bit p = position p is nonzero), the two stored
    positions ``(i0, i1)``: the nonzeros first, padded with the lowest free positions, sorted."""
    table = torch.zeros(16, 2, dtype=torch.uint8)
    for mask in range(16):
        nonzero = [p for p in range(4) if mask >> p & 1]
        free = [p for p in range(4) if not mask >> p & 1]
        table[mask] = torch.tensor(sorted((nonzero + free)[:2]), dtype=torch.uint8)
    return table


_PAIRS = _pair_table()


def kept_positions(nonzero: torch.Tensor) -> tuple:
    """For each group of 4 (``nonzero``: bool ``[N, K]`` with <= 2 per group), the two positions
    stored: ``(i0, i1)``, uint8 ``[N, K/4]`` each, ``i0 < i1``; nonzeros first, padding with the
    lowest free positions."""
    n, k = nonzero.shape
    g = nonzero.reshape(n, k // 4, 4).to(torch.uint8)
    mask = g[..., 0] | (g[..., 1] << 1) | (g[..., 2] << 2) | (g[..., 3] << 3)
    pairs = _PAIRS.to(nonzero.device)[mask.long()]
    return pairs[..., 0], pairs[..., 1]


def check_meta(meta: torch.Tensor, name: str = "meta"):
    """Every group's stored positions must satisfy ``i0 < i1`` (the kernels rely on it): refuse
    metadata that does not, naming the first offending group."""
    i0, i1 = unpack_meta(meta)
    bad = (i0 >= i1).nonzero()
    if len(bad):
        row, group = (int(v) for v in bad[0])
        raise ValueError(
            f"packed tensor {name!r}: group {group} of row {row} stores positions "
            f"({int(i0[row, group])}, {int(i1[row, group])}); each group needs i0 < i1"
        )


def pack_meta(i0: torch.Tensor, i1: torch.Tensor) -> torch.Tensor:
    """Positions ``[N, K/4]`` -> int32 metadata ``[K/32, N]`` (layout in the module docstring)."""
    return pack_nibbles(i0.to(torch.uint8) | (i1.to(torch.uint8) << 2)).t().contiguous()


def unpack_meta(meta: torch.Tensor) -> tuple:
    """int32 ``[K/32, N]`` -> positions ``(i0, i1)``, uint8 ``[N, K/4]`` each."""
    fields = unpack_nibbles(meta.t().contiguous())
    return fields & 3, fields >> 2


_POSITIONS = torch.arange(4, dtype=torch.uint8)


def scatter_kept(kept: torch.Tensor, i0: torch.Tensor, i1: torch.Tensor) -> torch.Tensor:
    """Kept entries ``[N, K/2]`` and their positions -> dense ``[N, K]`` (zeros elsewhere)."""
    n, half = kept.shape
    pairs = kept.reshape(n, half // 2, 2)
    pos = _POSITIONS.to(kept.device)
    first = i0.to(torch.uint8).unsqueeze(-1) == pos
    second = i1.to(torch.uint8).unsqueeze(-1) == pos
    zero = torch.zeros((), dtype=kept.dtype, device=kept.device)
    dense = torch.where(first, pairs[..., :1], torch.where(second, pairs[..., 1:], zero))
    return dense.reshape(n, half * 2)


def gather_kept(dense: torch.Tensor, i0: torch.Tensor, i1: torch.Tensor) -> torch.Tensor:
    """Dense ``[N, K]`` -> the entries at positions ``(i0, i1)`` of each group, ``[N, K/2]``."""
    n, k = dense.shape
    groups = dense.reshape(n, k // 4, 4)
    idx = torch.stack([i0, i1], dim=-1).to(torch.int64)
    return torch.gather(groups, 2, idx).reshape(n, k // 2)


@dataclass
class Sparse24Weight(PackedWeight):
    values: torch.Tensor  # [N, K/2] float16 / bfloat16 (float32: reference only)
    meta: torch.Tensor  # [K/32, N] int32
    shape: tuple  # (N, K)

    kind = "2:4"
    tensor_names = ("values", "meta")

    def unpack(self) -> torch.Tensor:
        """The dense weight ``[N, K]`` in the value dtype (exact)."""
        i0, i1 = unpack_meta(self.meta)
        return scatter_kept(self.values, i0, i1)

    def dense(self, dtype=torch.float32) -> torch.Tensor:
        return self.unpack().to(dtype)

    def layout(self) -> dict:
        return {"kind": self.kind, "shape": list(self.shape), "value_dtype": str(self.values.dtype).replace("torch.", "")}

    def validate(self):
        n, k = self.shape
        expect_tensor(self.values, (n, k // 2), VALUE_DTYPES, "values")
        expect_tensor(self.meta, (k // 32, n), (torch.int32,), "meta")
        check_meta(self.meta)


def pack_sparse24(weight: torch.Tensor, dtype: torch.dtype = None) -> Sparse24Weight:
    """Pack a 2:4-sparse weight ``[N, K]``.

    ``dtype``: the value dtype (default: the weight's own if float16/bfloat16, else float16).
    Raises PatternError naming the first group of 4 with more than 2 nonzeros."""
    n, k = check_matrix(weight)
    if dtype is None:
        dtype = weight.dtype if weight.dtype in (torch.float16, torch.bfloat16) else torch.float16
    if dtype not in VALUE_DTYPES:
        raise ValueError(f"2:4 values dtype {dtype} is not supported; allowed: float16, bfloat16, float32")
    nonzero = weight != 0
    check_2of4(nonzero)
    i0, i1 = kept_positions(nonzero)
    values = gather_kept(weight, i0, i1).to(dtype).contiguous()
    return Sparse24Weight(values=values, meta=pack_meta(i0, i1), shape=(n, k))

