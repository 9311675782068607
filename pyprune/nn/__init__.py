"""Drop-in ``nn.Linear`` replacements backed by packed weights and Triton kernels."""
from pyprune.nn.compressed_linear import (
    MODULES, CompressedLinear, Int4Linear, Sparse24Int4Linear, Sparse24Linear, cache_reference_weights,
)

__all__ = ["MODULES", "cache_reference_weights", "CompressedLinear", "Sparse24Linear", "Int4Linear", "Sparse24Int4Linear"]
