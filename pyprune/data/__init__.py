"""Calibration and evaluation text."""
from pyprune.data.calibration import (
    calibration_tokens, evaluation_tokens, sample_windows, tokenize_joined,
)
from pyprune.data.text import DATASETS, load_texts

__all__ = [
    "calibration_tokens", "evaluation_tokens", "sample_windows", "tokenize_joined",
    "DATASETS", "load_texts",
]
