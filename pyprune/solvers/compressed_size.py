"""Storage cost of a (sparse and/or INT4) weight matrix: effective bits per weight and bytes.

The accounting model (what a compressed checkpoint or kernel must hold):

* values: ``wbits`` per stored weight (4 for INT4, 16 for fp16/bf16);
* scales (INT4 only): one float16 per output row per group;
* sparsity metadata:
  - N:M (keep N of every M): only kept values are stored, each with a ``ceil(log2 M)``-bit index
    inside its group (2:4: 2 bits per kept value = 1 bit per weight);
  - unstructured: kept values plus a 1-bit-per-weight bitmask, unless storing the zeros densely is
    smaller (below 1/wbits sparsity), in which case the layout is dense.

``bits_per_weight`` divides the total by the number of weights of the dense matrix, so fp16
dense is 16, INT4 g128 dense is 4.125, 2:4 + INT4 g128 is 3.125.
"""
import functools
import math
import operator
from dataclasses import dataclass
from typing import Iterable, Optional

import torch

from pyprune.ops import int4_grid

VALID_WBITS = (4, 16)


@dataclass
class StorageCost:
    numel: int
    value_bits: int
    scale_bits: int
    meta_bits: int
    layout: str

    @property
    def total_bits(self) -> int:
        return self.value_bits + self.scale_bits + self.meta_bits

    @property
    def bits_per_weight(self) -> float:
        return self.total_bits / self.numel if self.numel else 0.0

    @property
    def nbytes(self) -> int:
        return math.ceil(self.total_bits / 8)

    def __add__(self, other: "StorageCost") -> "StorageCost":
        layout = self.layout if self.layout == other.layout else "mixed"
        return StorageCost(
            self.numel + other.numel, self.value_bits + other.value_bits,
            self.scale_bits + other.scale_bits, self.meta_bits + other.meta_bits, layout,
        )

    def as_dict(self) -> dict:
        return {
            "numel": self.numel, "layout": self.layout, "value_bits": self.value_bits,
            "scale_bits": self.scale_bits, "meta_bits": self.meta_bits,
            "bits_per_weight": self.bits_per_weight, "bytes": self.nbytes,
        }


def layer_storage(
    shape,
    *,
    wbits: int = 4,
    groupsize: int = 128,
    pruned: Optional[torch.Tensor] = None,
    sparsity: Optional[float] = None,
    nm: Optional[tuple] = None,
) -> StorageCost:
    """Cost of one ``[out, in]`` matrix.

    Sparsity comes from ``nm=(n, m)`` (N:M layout), else the mask ``pruned`` (True = removed),
    else the fraction ``sparsity``; none of them means dense. ``groupsize`` counts only for
    ``wbits=4`` (-1 = per channel).
    """
    if wbits not in VALID_WBITS:
        raise ValueError(f"wbits={wbits} is not supported; allowed: {', '.join(map(str, VALID_WBITS))}")
    rows, cols = (int(s) for s in shape)
    numel = rows * cols
    scale_bits = 0
    if wbits == 4:
        g = int4_grid.check_groupsize(groupsize, cols)
        scale_bits = rows * (cols // g) * int4_grid.SCALE_BITS
    if nm is not None:
        n, m = nm
        if not (0 < n < m) or cols % m:
            raise ValueError(f"N:M pattern {n}:{m} is invalid for width {cols}: need 0 < N < M and M dividing the width")
        kept = numel // m * n
        return StorageCost(numel, kept * wbits, scale_bits, kept * math.ceil(math.log2(m)), f"{n}:{m}")
    if pruned is not None:
        if tuple(pruned.shape) != (rows, cols):
            raise ValueError(f"mask shape {tuple(pruned.shape)} does not match the layer shape {(rows, cols)}")
        kept = numel - int(pruned.sum())
    elif sparsity is not None:
        if not 0.0 <= sparsity < 1.0:
            raise ValueError(f"sparsity={sparsity} is outside [0, 1)")
        kept = numel - int(round(sparsity * numel))
    else:
        kept = numel
    if kept < numel and kept * wbits + numel < numel * wbits:
        return StorageCost(numel, kept * wbits, scale_bits, numel, "bitmask")
    return StorageCost(numel, numel * wbits, scale_bits, 0, "dense")


def total_storage(costs: Iterable[StorageCost]) -> StorageCost:
    """Sum of per-layer costs (e.g. every pruned/quantized Linear of a model)."""
    costs = list(costs)
    return functools.reduce(operator.add, costs) if costs else StorageCost(0, 0, 0, 0, "empty")


def model_size_bytes(linear_costs: Iterable[StorageCost], other_params_bytes: int = 0) -> int:
    """Compressed model size: the compressed Linears plus everything stored as is
    (embeddings, lm_head, norms: pass their byte count as ``other_params_bytes``)."""
    return total_storage(linear_costs).nbytes + int(other_params_bytes)
