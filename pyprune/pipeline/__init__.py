"""The sequential calibration pipeline."""
from pyprune.pipeline.runner import RunOptions, prune_model
from pyprune.pipeline.scale_tuning import ScaleTuning

__all__ = ["RunOptions", "ScaleTuning", "prune_model"]
