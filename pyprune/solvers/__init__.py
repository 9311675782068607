"""Solvers: pure functions on one weight matrix (see ``base.py`` for the contract)."""
from pyprune.solvers import admm, magnitude, sparsegpt, wanda
from pyprune.solvers.base import LayerStats, SolverResult, reconstruction_loss
from pyprune.solvers.pattern import SparsityPattern, select_pruned

SOLVERS = {
    "magnitude": magnitude.solve,
    "wanda": wanda.solve,
    "sparsegpt": sparsegpt.solve,
    "admm": admm.solve,
}

# Solvers that need no calibration statistics at all.
STATISTICS_FREE = {"magnitude"}


def get_solver(name: str):
    try:
        return SOLVERS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; allowed: {', '.join(sorted(SOLVERS))}") from None


__all__ = [
    "LayerStats", "SolverResult", "SparsityPattern", "SOLVERS", "STATISTICS_FREE",
    "get_solver", "reconstruction_loss", "select_pruned",
]
