"""Sparsity patterns and mask selection from scores.

A pattern is either unstructured (a fraction ``sparsity`` in [0, 1) of the weights removed) or
N:M (in every group of ``m`` consecutive input columns of a row, ``n`` weights are kept and
``m - n`` removed; 2:4 and 4:8 are 50 %). Masks in pyprune are bool tensors with True = pruned.
"""
import re
from dataclasses import dataclass
from typing import Optional

import torch

from pyprune.ops.selection import MODE_LAYER, MODE_NM, MODE_ROW, select_lowest


@dataclass(frozen=True)
class SparsityPattern:
    sparsity: float = 0.0
    n: Optional[int] = None
    m: Optional[int] = None

    def __post_init__(self):
        if self.m is None:
            if self.n is not None:
                raise ValueError("an N:M pattern needs both n and m")
            if not (0.0 <= float(self.sparsity) < 1.0):
                raise ValueError(f"sparsity={self.sparsity} is outside the allowed range [0, 1)")
        else:
            if self.n is None or not (0 < self.n < self.m):
                raise ValueError(f"N:M pattern {self.n}:{self.m} is invalid: need 0 < N < M (e.g. 2:4, 4:8)")
            object.__setattr__(self, "sparsity", 1.0 - self.n / self.m)

    @property
    def is_nm(self) -> bool:
        return self.m is not None

    @property
    def nm(self):
        return (self.n, self.m) if self.is_nm else None

    def __str__(self):
        return f"{self.n}:{self.m}" if self.is_nm else f"{self.sparsity:g}"

    @classmethod
    def parse(cls, text) -> "SparsityPattern":
        """``"0.5"`` -> unstructured 50 %; ``"2:4"`` -> keep 2 of every 4."""
        text = str(text).strip()
        match = re.fullmatch(r"(\d+):(\d+)", text)
        if match:
            return cls(n=int(match.group(1)), m=int(match.group(2)))
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"cannot read sparsity pattern {text!r}: use a fraction in [0, 1) or N:M such as 2:4") from None
        return cls(sparsity=value)

    def with_sparsity(self, sparsity: float) -> "SparsityPattern":
        if self.is_nm:
            raise ValueError(f"an N:M pattern ({self}) has a fixed sparsity")
        return SparsityPattern(sparsity=sparsity)

    def check_width(self, in_features: int, name: str = "layer"):
        """Raise before any work if the pattern cannot apply to a layer of this width."""
        if self.is_nm and in_features % self.m:
            raise ValueError(
                f"N:M pattern {self} needs the input width to be a multiple of {self.m}, "
                f"but {name} has {in_features} input features"
            )


def select_pruned(score: torch.Tensor, pattern: SparsityPattern, per_row: bool = False) -> torch.Tensor:
    """Bool mask (True = prune) removing the lowest-scoring weights under ``pattern``.

    Unstructured: the ``round(sparsity * numel)`` lowest scores of the whole matrix, or
    ``round(sparsity * cols)`` per row when ``per_row``. N:M: the ``m - n`` lowest of each group.
    Ties are broken by position, so the count is always exact (:mod:`pyprune.ops.selection`;
    temporaries stay small whatever the matrix size).
    """
    rows, cols = score.shape
    if pattern.is_nm:
        pattern.check_width(cols)
        return select_lowest(score, MODE_NM, n=pattern.n, m=pattern.m)
    if per_row:
        return select_lowest(score, MODE_ROW, k=int(round(pattern.sparsity * cols)))
    return select_lowest(score, MODE_LAYER, k=int(round(pattern.sparsity * score.numel())))
