"""The sequential calibration pipeline."""
from pyprune.pipeline.runner import RunOptions, prune_model

__all__ = ["RunOptions", "prune_model"]
