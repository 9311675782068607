"""Solvers: pure functions on one weight matrix (see ``base.py`` for the contract)."""
from typing import Optional

from pyprune.solvers import admm, magnitude, sparsegpt, wanda
from pyprune.solvers.base import LayerStats, SolverResult, reconstruction_loss
from pyprune.solvers.pattern import SparsityPattern, select_pruned

SOLVERS = {
    "magnitude": magnitude.solve,
    "wanda": wanda.solve,
    "sparsegpt": sparsegpt.solve,
    "admm": admm.solve,
}

# What each solver reads from the calibration data: nothing, the input norms (the Hessian's
# diagonal) or the full Hessian. A solver function outside this table declares it as its
# ``statistics`` attribute (default: the Hessian).
STATISTICS = {"magnitude": None, "wanda": "input_norms", "sparsegpt": "hessian", "admm": "hessian"}
STATISTICS_FREE = {name for name, kind in STATISTICS.items() if kind is None}


def statistics_needed(method) -> Optional[str]:
    """``None``, ``"input_norms"`` or ``"hessian"`` for a solver name or solver function."""
    if isinstance(method, str):
        get_solver(method)  # unknown names fail here, with the list of allowed ones
        return STATISTICS[method]
    registered = [name for name, solve in SOLVERS.items() if solve is method]
    return STATISTICS[registered[0]] if registered else getattr(method, "statistics", "hessian")


def get_solver(name: str):
    try:
        return SOLVERS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; allowed: {', '.join(sorted(SOLVERS))}") from None


__all__ = [
    "LayerStats", "SolverResult", "SparsityPattern", "SOLVERS", "STATISTICS_FREE",
    "get_solver", "reconstruction_loss", "select_pruned", "statistics_needed",
]
