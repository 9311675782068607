"""Layer-wise sparsity from inverse-Hessian error estimates (Zhang et al., arXiv 2409.20094).

Each unit (a decoder layer, or one Linear with ``granularity="linear"``) gets the OBS estimate of
its pruning loss at the target sparsity (``estimate.py``; a layer's estimate is the sum over its
Linears); the log estimates are clustered into levels and mapped into ``[lo, hi]`` with the
parameter-weighted mean equal to the target (``levels.py``).

``normalise="none"`` (as in the paper) clusters the estimates themselves: mean per-token squared
output error, one scale for all layers. ``normalise="output"`` divides each unit's estimate by its
dense output energy ``0.5 tr(W H W^T)`` (the fraction of its output that pruning destroys), which
removes the growth of activations with depth but is dominated by layers with massive activations.
``normalise="residual"`` divides it by the mean squared norm of the residual stream the layer
writes into (from the dense pre-pass, the first token of each window left out): every later layer
reads the residual stream through an RMS norm, so an error matters in proportion to the stream's
size, not in absolute units. In absolute units the estimates grow with depth as the stream does,
and the raw schedule prunes the first layers hardest, whose errors every later layer inherits.
``"residual"`` is the default: on the quick proxy of ``bench/bench_schedule.py`` (SparseGPT at
0.7, ``bench/results/schedule_quick.md``) it gave perplexity 360 against 669 for uniform, while
``"none"`` was worse than uniform (1551 against 578, both with plain statistics).

Where the statistics come from. Clustering needs every unit's estimate before layer 0 is pruned,
but the estimate of layer ``l`` should use the inputs layer ``l`` really sees (after layers
``< l`` were pruned). Two sources, no second pruning pass:

1. A dense pre-pass (``pyprune.pipeline.prepass``) runs the calibration windows through the dense
   decoder layers once, collecting each layer's Hessians and computing the dense estimates;
   ``finish_prepass`` makes the global plan from them. Cost: one forward of every decoder layer
   with Hessian accumulation, plus one inverse-Hessian factor per distinct Linear input (about
   the statistics half of the pruning pass, and none of its solver or second forward).
2. Online correction (``online=True``, the default): when the pipeline calls ``observe(l, ...)``
   with the statistics of the inputs layer ``l`` really sees, the estimates of layer ``l`` are
   recomputed from them (the solver needs the same factor; this costs one more factorisation per
   distinct input), the not-yet-seen layers' dense estimates are scaled by the drift observed so
   far (geometric mean of real/dense over the seen units), the levels are recomputed over all
   units, and the sparsities of layers ``>= l`` are re-solved for the budget that layers ``< l``
   left, so the final mean is still the target exactly. Layer ``l`` is then fixed. The re-solve is
   always feasible: the remaining budget was met inside the range by the previous solve.
   The residual energies (``normalise="residual"``) stay the dense pre-pass's.

With ``online=False`` the dense plan is used as it is. Each plan is monotone in the estimates it
was made from; with online correction a layer fixed early keeps its sparsity even if a later
estimate would have ranked it differently.
"""
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, Optional

from pyprune.schedule import levels as lv
from pyprune.schedule.estimate import estimate_linears
from pyprune.solvers.base import output_energy
from pyprune.solvers.pattern import SparsityPattern

DEFAULT_LEVELS = 4
DEFAULT_RANGE = (0.6, 0.8)
GRANULARITIES = ("layer", "linear")
NORMALISATIONS = ("none", "output", "residual")
DEFAULT_NORMALISATION = "residual"


@dataclass
class Unit:
    layer: int
    name: Optional[str]  # None for a whole decoder layer
    parameters: int
    dense: float  # allocation score from the dense pre-pass
    real: Optional[float] = None  # allocation score from the statistics the pipeline passed to observe()
    linears: Dict[str, float] = field(default_factory=dict)  # per-Linear OBS loss estimates (latest source)
    energies: Dict[str, float] = field(default_factory=dict)  # per-Linear output energies (latest source)
    residual: float = 0.0  # mean squared residual-stream norm after the layer (dense pre-pass)
    level: Optional[int] = None  # level and sparsity once fixed (handed to the solver)
    sparsity: Optional[float] = None


class HessianSchedule:
    name = "hessian"
    needs_statistics = True
    prepass_statistics = "hessian"

    def __init__(self, target, sparsity_range=DEFAULT_RANGE, levels: int = DEFAULT_LEVELS,
                 granularity: str = "layer", damp: float = 0.01, blocksize: int = 128, online: bool = True,
                 undamped: bool = True, normalise: str = DEFAULT_NORMALISATION):
        target = _unstructured(target, self.name)
        lo, hi = (float(x) for x in sparsity_range)
        lv.check_range(target.sparsity, lo, hi)
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity={granularity!r}; allowed: {', '.join(GRANULARITIES)}")
        if normalise not in NORMALISATIONS:
            raise ValueError(f"normalise={normalise!r}; allowed: {', '.join(NORMALISATIONS)}")
        if not (math.isfinite(damp) and damp > 0):
            raise ValueError(f"damp={damp}: need a finite value > 0")
        if int(blocksize) != blocksize or blocksize < 1:
            raise ValueError(f"blocksize={blocksize}: need an integer >= 1")
        self.target = target
        self.lo, self.hi = lo, hi
        self.levels = lv.check_levels(levels)
        self.granularity = granularity
        self.damp, self.blocksize, self.online = float(damp), int(blocksize), bool(online)
        self.undamped, self.normalise = bool(undamped), normalise
        self.units = []
        self.plan: Optional[lv.Allocation] = None
        # Wall seconds: the dense pre-pass (its estimates included, also shown alone), the first
        # plan, and the online work inside observe(); "total" is the scheduler's whole cost.
        self.seconds = {"prepass": 0.0, "prepass_estimates": 0.0, "plan": 0.0, "online": 0.0, "total": 0.0}

    # -- configuration ------------------------------------------------------------------------
    def config(self) -> dict:
        """What identifies this schedule (goes into the --resume fingerprint)."""
        return {"schedule": self.name, "target": str(self.target), "range": [self.lo, self.hi],
                "levels": self.levels, "granularity": self.granularity, "damp": self.damp,
                "blocksize": self.blocksize, "online": self.online, "undamped": self.undamped,
                "normalise": self.normalise}

    # -- dense pre-pass -----------------------------------------------------------------------
    def needs_prepass(self) -> bool:
        return self.plan is None

    def prepass_observe(self, layer_index, stats_by_name, weights_by_name, residual_energy=None):
        if layer_index == 0:
            self.units = []
        if self.normalise == "residual" and not (residual_energy and residual_energy > 0):
            raise ValueError(f"normalise='residual' needs the residual energy of layer {layer_index}; "
                             f"got {residual_energy!r}")
        t0 = time.time()
        estimates, energies = self._estimate(weights_by_name, stats_by_name)
        for group in self._group(weights_by_name):
            params = sum(weights_by_name[n].numel() for n in group)
            unit = Unit(layer_index, group[0] if self.granularity == "linear" else None, params, 0.0,
                        linears={n: estimates[n] for n in group}, energies={n: energies.get(n, 0.0) for n in group},
                        residual=float(residual_energy or 0.0))
            unit.dense = self._score(unit)
            self.units.append(unit)
        self.seconds["prepass_estimates"] += time.time() - t0

    def finish_prepass(self, seconds: float = 0.0):
        if not self.units:
            raise ValueError("the pre-pass saw no layers; nothing to schedule")
        t0 = time.time()
        self._replan()
        self._spent("prepass", seconds)
        self._spent("plan", time.time() - t0)

    # -- the pipeline's interface -------------------------------------------------------------
    def observe(self, layer_index, stats_by_name, weights_by_name):
        self._require_plan()
        t0 = time.time()
        mine = [i for i, u in enumerate(self.units) if u.layer == layer_index]
        if not mine:
            raise ValueError(f"layer {layer_index} was not seen by the pre-pass ({self._nlayers()} layers)")
        if self.online:
            estimates, energies = self._estimate(weights_by_name, stats_by_name)
            for i in mine:
                unit = self.units[i]
                unit.linears = {n: estimates[n] for n in unit.linears}
                unit.energies = {n: energies.get(n, 0.0) for n in unit.linears}
                unit.real = self._score(unit)
            self._replan()
        for i in mine:
            self.units[i].level = self.plan.levels[i]
            self.units[i].sparsity = self.plan.sparsities[i]
        self._spent("online", time.time() - t0)

    def pattern_for(self, layer_index: int, name: str) -> SparsityPattern:
        self._require_plan()
        i = self._unit_index(layer_index, name)
        fixed = self.units[i].sparsity
        return SparsityPattern(sparsity=fixed if fixed is not None else self.plan.sparsities[i])

    def describe(self) -> dict:
        out = dict(self.config(), seconds=dict(self.seconds))
        if self.plan is None:
            return out
        params = [u.parameters for u in self.units]
        sparsities = [u.sparsity if u.sparsity is not None else s for u, s in zip(self.units, self.plan.sparsities)]
        levels = [u.level if u.level is not None else k for u, k in zip(self.units, self.plan.levels)]
        out.update(
            levels_used=self.plan.nlevels,
            mean_sparsity=lv.weighted_mean(sparsities, params),
            units=[{
                "layer": u.layer, "name": u.name, "parameters": u.parameters,
                "estimate": u.real if u.real is not None else u.dense, "estimate_dense": u.dense,
                "estimate_real": u.real, "loss_estimate": sum(u.linears.values()),
                "output_energy": sum(u.energies.values()), "residual_energy": u.residual,
                "linear_estimates": u.linears,
                "log_estimate": self.plan.log_errors[i], "level": levels[i],
                "sparsity": sparsities[i],
            } for i, u in enumerate(self.units)],
        )
        return out

    def state(self) -> dict:
        return {"config": self.config(), "units": [asdict(u) for u in self.units],
                "plan": asdict(self.plan) if self.plan is not None else None, "seconds": self.seconds}

    def restore(self, state: dict):
        if not state or state.get("plan") is None:
            return
        if state.get("config") != self.config():
            raise ValueError(f"saved schedule state {state.get('config')} does not match {self.config()}")
        self.units = [Unit(**u) for u in state["units"]]
        self.plan = lv.Allocation(**state["plan"])
        self.seconds = dict(state.get("seconds") or self.seconds)

    # -- internals ----------------------------------------------------------------------------
    def _estimate(self, weights_by_name, stats_by_name):
        missing = [n for n in weights_by_name if stats_by_name.get(n) is None]
        if missing:
            raise ValueError(f"the hessian schedule needs calibration statistics; none for {missing}")
        curves = estimate_linears(weights_by_name, stats_by_name, [self.target.sparsity], self.damp, self.blocksize,
                                  self.undamped)
        energies = {n: output_energy(W, stats_by_name[n].H) for n, W in weights_by_name.items()} \
            if self.normalise == "output" else {}
        return {n: c[0] for n, c in curves.items()}, energies

    def _score(self, unit):
        """What the levels are made from: the OBS loss estimate, divided by the unit's output energy
        (``normalise="output"``) or by the residual stream's energy (``"residual"``)."""
        loss = sum(unit.linears.values())
        if self.normalise == "none":
            return loss
        scale = sum(unit.energies.values()) if self.normalise == "output" else unit.residual
        return loss / max(scale, 1e-30)

    def _group(self, weights_by_name):
        names = list(weights_by_name)
        return [[n] for n in names] if self.granularity == "linear" else [names]

    def _current_estimates(self):
        """Real estimates where seen; dense ones elsewhere, scaled by the drift seen so far."""
        ratios = [math.log(max(u.real, 1e-30) / max(u.dense, 1e-30)) for u in self.units if u.real is not None]
        drift = math.exp(sum(ratios) / len(ratios)) if ratios else 1.0
        return [u.real if u.real is not None else u.dense * drift for u in self.units]

    def _spent(self, key, seconds):
        self.seconds[key] += seconds
        self.seconds["total"] += seconds

    def _replan(self):
        fixed = {i: u.sparsity for i, u in enumerate(self.units) if u.sparsity is not None}
        self.plan = lv.allocate(self._current_estimates(), [u.parameters for u in self.units],
                                self.target.sparsity, self.lo, self.hi, self.levels, fixed)

    def _require_plan(self):
        if self.plan is None:
            raise RuntimeError("the hessian schedule has no plan yet: run the dense pre-pass "
                               "(pyprune.pipeline.prepass.run_prepass) before pruning")

    def _unit_index(self, layer_index, name):
        for i, u in enumerate(self.units):
            if u.layer == layer_index and (u.name is None or u.name == name):
                return i
        raise KeyError(f"no scheduled unit for layer {layer_index} Linear {name!r}")

    def _nlayers(self):
        return len({u.layer for u in self.units})


def _unstructured(target, schedule_name) -> SparsityPattern:
    if not isinstance(target, SparsityPattern):
        target = SparsityPattern(sparsity=float(target))
    if target.is_nm:
        raise ValueError(
            f"schedule {schedule_name!r} gives each layer its own unstructured sparsity, but the target "
            f"{target} is an N:M pattern (fixed sparsity); use the uniform schedule for N:M patterns"
        )
    return target
