"""Packed weight layouts with a documented ``pack()``/``unpack()`` and an exact round trip.

* ``sparse24``: 2:4 sparse, fp16/bf16 kept values ``[N, K/2]`` + 2-bit positions.
* ``int4``: INT4 codes 8 per int32 along K + fp16 scales per group (the int4_grid format).
* ``sparse24_int4``: 2:4 sparse with INT4 kept values + positions + scales.
"""
from pyprune.formats.base import PackedWeight, PatternError
from pyprune.formats.int4 import Int4Weight, pack_int4, quantize_int4, rtn_codes
from pyprune.formats.sparse24 import Sparse24Weight, pack_sparse24
from pyprune.formats.sparse24_int4 import Sparse24Int4Weight, pack_sparse24_int4, quantize_sparse24_int4

# Format names as the CLI spells them -> packed class.
FORMATS = {"2:4": Sparse24Weight, "int4": Int4Weight, "2:4-int4": Sparse24Int4Weight}
_ALIASES = {"sparse24": "2:4", "2:4+int4": "2:4-int4", "sparse24-int4": "2:4-int4", "sparse24_int4": "2:4-int4"}


def canonical_format(name: str) -> str:
    """Normalise a format name (``"2:4"``, ``"int4"``, ``"2:4-int4"`` and a few aliases)."""
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    if key not in FORMATS:
        raise ValueError(f"unknown compressed format {name!r}; allowed: {', '.join(FORMATS)}")
    return key


__all__ = [
    "FORMATS", "canonical_format", "PackedWeight", "PatternError",
    "Sparse24Weight", "pack_sparse24",
    "Int4Weight", "pack_int4", "quantize_int4", "rtn_codes",
    "Sparse24Int4Weight", "pack_sparse24_int4", "quantize_sparse24_int4",
]
