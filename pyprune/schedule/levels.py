"""From per-unit error estimates to per-unit sparsities (a unit is a decoder layer or a Linear).

1. Take ``log`` of the estimates (errors span orders of magnitude across depth; in log space a
   factor of 10 is the same step wherever it happens).
2. Group them into at most ``levels`` levels by optimal 1-D k-means (exact dynamic programming on
   the sorted values, so a level is an interval of the log errors and the result is
   deterministic). Equal estimates always share a level.
3. Map the levels to evenly spaced sparsities: the highest-error level gets ``lo``, the lowest
   gets ``hi``.
4. Renormalise: add one shift ``t`` to every free unit and clip to ``[lo, hi]``, with ``t`` solved
   so that the parameter-weighted mean sparsity equals the target. A common shift followed by a
   clip keeps the order (higher error never gets higher sparsity) and the range.
"""
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

MEAN_TOLERANCE = 1e-9


@dataclass
class Allocation:
    sparsities: List[float]
    levels: List[int]  # 0 = lowest estimated error (highest sparsity)
    log_errors: List[float]
    nlevels: int  # levels actually used (at most the number of distinct estimates)


def check_range(target: float, lo: float, hi: float):
    """Refuse a range that is not inside [0, 1) or does not contain the target."""
    if not (0.0 <= lo <= hi < 1.0):
        raise ValueError(f"sparsity range [{lo}, {hi}] is invalid: need 0 <= LO <= HI < 1")
    if not (lo - 1e-12 <= target <= hi + 1e-12):
        raise ValueError(f"target sparsity {target} is outside the sparsity range [{lo}, {hi}]: "
                         f"a mean inside the range is needed")


def check_levels(levels) -> int:
    if isinstance(levels, bool) or int(levels) != levels or levels < 1:
        raise ValueError(f"levels={levels!r}: need an integer >= 1")
    return int(levels)


def cluster_1d(values: Sequence[float], k: int, tol: float = 1e-9) -> List[int]:
    """Level of each value under optimal 1-D k-means with at most ``k`` clusters.

    Values closer than ``tol`` are treated as one point (weighted by its multiplicity), so equal
    values always share a level. Levels are numbered 0.. from the lowest values up.
    """
    k = check_levels(k)
    if not values:
        return []
    order = sorted(range(len(values)), key=lambda i: values[i])
    points, weights, point_of = [], [], [0] * len(values)
    for i in order:
        if points and values[i] - points[-1][-1] <= tol:
            points[-1].append(values[i])
        else:
            points.append([values[i]])
        point_of[i] = len(points) - 1
    xs = [sum(p) / len(p) for p in points]
    weights = [len(p) for p in points]
    bounds = _kmeans_1d(xs, weights, min(k, len(xs)))
    level_of_point = [0] * len(xs)
    for level, (a, b) in enumerate(bounds):
        for j in range(a, b):
            level_of_point[j] = level
    return [level_of_point[point_of[i]] for i in range(len(values))]


def _kmeans_1d(xs, ws, k):
    """Optimal partition of sorted ``xs`` (weights ``ws``) into ``k`` intervals: ``[(a, b), ...]``."""
    n = len(xs)
    # Prefix sums give the within-cluster sum of squares of any interval in O(1).
    W, S, Q = [0.0], [0.0], [0.0]
    for x, w in zip(xs, ws):
        W.append(W[-1] + w)
        S.append(S[-1] + w * x)
        Q.append(Q[-1] + w * x * x)

    def cost(a, b):  # interval xs[a:b]
        w = W[b] - W[a]
        s = S[b] - S[a]
        return max(0.0, (Q[b] - Q[a]) - s * s / w)

    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(k + 1)]
    cut = [[0] * (n + 1) for _ in range(k + 1)]
    best[0][0] = 0.0
    for c in range(1, k + 1):
        for b in range(c, n + 1):
            for a in range(c - 1, b):
                value = best[c - 1][a] + cost(a, b)
                if value < best[c][b]:
                    best[c][b], cut[c][b] = value, a
    bounds, b = [], n
    for c in range(k, 0, -1):
        a = cut[c][b]
        bounds.append((a, b))
        b = a
    return bounds[::-1]


def level_sparsities(levels: Sequence[int], nlevels: int, lo: float, hi: float, target: float) -> List[float]:
    """Evenly spaced sparsities: level 0 (lowest error) -> ``hi``, top level -> ``lo``."""
    if nlevels <= 1:
        return [float(target)] * len(levels)
    return [hi - (hi - lo) * level / (nlevels - 1) for level in levels]


def fit_mean(base: Sequence[float], params: Sequence[float], mean: float, lo: float, hi: float) -> List[float]:
    """``clip(base + t, lo, hi)`` with ``t`` such that the ``params``-weighted mean is ``mean``."""
    if not base:
        return []
    if not (lo - 1e-12 <= mean <= hi + 1e-12):
        raise ValueError(f"a mean sparsity of {mean} cannot be reached inside [{lo}, {hi}]")
    mean = min(max(mean, lo), hi)
    total = float(sum(params))

    def mean_at(t):
        return sum(p * min(max(b + t, lo), hi) for b, p in zip(base, params)) / total

    # mean_at is continuous and non-decreasing, from lo (t -> -inf) to hi (t -> +inf).
    a, b = lo - max(base) - 1.0, hi - min(base) + 1.0
    for _ in range(200):
        m = 0.5 * (a + b)
        if mean_at(m) < mean:
            a = m
        else:
            b = m
    t = 0.5 * (a + b)
    # On the final linear piece, solve for t exactly (bisection alone leaves a few ulps).
    inside = {i for i, x in enumerate(base) if lo < x + t < hi}
    if inside:
        clipped = sum(p * min(max(x + t, lo), hi) for i, (x, p) in enumerate(zip(base, params)) if i not in inside)
        free = sum(params[i] for i in inside)
        t = (mean * total - clipped - sum(params[i] * base[i] for i in inside)) / free
    out = [min(max(x + t, lo), hi) for x in base]
    return out


def allocate(errors: Sequence[float], params: Sequence[float], target: float, lo: float, hi: float,
             levels: int, fixed: Optional[Dict[int, float]] = None) -> Allocation:
    """Sparsity of every unit from its estimated error (see the module docstring).

    ``params``: parameter count of each unit (the mean is weighted by it). ``fixed``: units whose
    sparsity is already decided (pruned); the others share the rest of the budget so that the
    mean over all units is still ``target``.
    """
    if len(errors) != len(params) or not errors:
        raise ValueError(f"need one parameter count per estimate ({len(errors)} estimates, {len(params)} counts)")
    if any(p <= 0 for p in params):
        raise ValueError("every unit needs a positive parameter count")
    if any(not math.isfinite(e) or e < 0 for e in errors):
        raise ValueError(f"error estimates must be finite and >= 0, got {list(errors)}")
    check_range(target, lo, hi)
    levels = check_levels(levels)
    fixed = dict(fixed or {})
    logs = [math.log(max(e, 1e-30)) for e in errors]
    level = cluster_1d(logs, levels)
    nlevels = max(level) + 1
    base = level_sparsities(level, nlevels, lo, hi, target)
    free = [i for i in range(len(errors)) if i not in fixed]
    sparsities = [fixed.get(i, 0.0) for i in range(len(errors))]
    if free:
        budget = target * sum(params) - sum(params[i] * s for i, s in fixed.items())
        free_params = [params[i] for i in free]
        solved = fit_mean([base[i] for i in free], free_params, budget / sum(free_params), lo, hi)
        for i, s in zip(free, solved):
            sparsities[i] = s
    return Allocation(sparsities, level, logs, nlevels)


def weighted_mean(values: Sequence[float], params: Sequence[float]) -> float:
    return sum(v * p for v, p in zip(values, params)) / float(sum(params))
