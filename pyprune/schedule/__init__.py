"""Per-layer sparsity allocation."""
from pyprune.schedule.uniform import UniformSchedule

__all__ = ["UniformSchedule"]
