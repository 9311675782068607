"""Sparsity schedules decide each Linear's pattern. ``UniformSchedule`` gives every Linear the
target pattern; other schedules follow the same interface.

Interface used by the pipeline:
``observe(layer_index, stats_by_name, weights_by_name)`` is called once per decoder layer after
its calibration statistics were collected and before it is pruned (statistics are computed on
the inputs that layer really sees, i.e. after earlier layers were pruned);
``pattern_for(layer_index, name)`` returns the :class:`SparsityPattern` for one Linear;
``describe()`` returns what goes into the report.
"""
from pyprune.solvers.pattern import SparsityPattern


class UniformSchedule:
    name = "uniform"

    def __init__(self, target: SparsityPattern):
        self.target = target

    def observe(self, layer_index, stats_by_name, weights_by_name):
        pass

    def pattern_for(self, layer_index: int, name: str) -> SparsityPattern:
        return self.target

    def describe(self) -> dict:
        return {"schedule": self.name, "target": str(self.target)}
