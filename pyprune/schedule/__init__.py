"""Per-layer sparsity allocation: ``uniform``, ``owl`` and ``hessian`` (inverse-Hessian estimates).

Schedules that need every layer's statistics before pruning starts (``owl``, ``hessian``) have
``needs_prepass()``; the pipeline then runs ``pyprune.pipeline.prepass.run_prepass`` first.
"""
from pyprune.schedule.hessian import (DEFAULT_LEVELS, DEFAULT_NORMALISATION, DEFAULT_RANGE, GRANULARITIES,
                                     NORMALISATIONS, HessianSchedule)
from pyprune.schedule.owl import DEFAULT_LAMBDA, DEFAULT_M, OWLSchedule
from pyprune.schedule.uniform import UniformSchedule
from pyprune.solvers.pattern import SparsityPattern

SCHEDULES = ("uniform", "owl", "hessian")


def make_schedule(name: str, target, *, sparsity_range=DEFAULT_RANGE, levels: int = DEFAULT_LEVELS,
                  granularity: str = "layer", owl_m: float = DEFAULT_M, owl_lambda: float = DEFAULT_LAMBDA,
                  damp: float = 0.01, online: bool = True, undamped: bool = True,
                  normalise: str = DEFAULT_NORMALISATION):
    """Build a schedule by name. ``target``: a :class:`SparsityPattern` or a sparsity.

    Options a schedule does not use are ignored (``levels`` means nothing to ``owl``). Every value
    is checked here, before any model is loaded.
    """
    if not isinstance(target, SparsityPattern):
        target = SparsityPattern(sparsity=float(target))
    if name == "uniform":
        return UniformSchedule(target)
    if name == "owl":
        return OWLSchedule(target, m=owl_m, lam=owl_lambda)
    if name == "hessian":
        return HessianSchedule(target, sparsity_range=sparsity_range, levels=levels, granularity=granularity,
                               damp=damp, online=online, undamped=undamped, normalise=normalise)
    raise ValueError(f"unknown schedule {name!r}; allowed: {', '.join(SCHEDULES)}")


__all__ = [
    "DEFAULT_LAMBDA", "DEFAULT_LEVELS", "DEFAULT_M", "DEFAULT_NORMALISATION", "DEFAULT_RANGE", "GRANULARITIES",
    "NORMALISATIONS", "SCHEDULES", "HessianSchedule", "OWLSchedule", "UniformSchedule", "make_schedule",
]
