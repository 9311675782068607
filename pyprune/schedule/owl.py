"""OWL: outlier-weighted layerwise sparsity (Yin et al., 2023).

Per decoder layer, the outlier ratio is the fraction of the layer's Wanda scores
``|W_ij| * ||x_j||`` (all its Linears together) above ``m`` times their mean. The ratios are
rescaled linearly to ``[0, 2*lam]``, centred on their parameter-weighted mean, and subtracted from
the target: layers with more outliers are pruned less, sparsities stay within ``target +- 2*lam``
and the parameter-weighted mean is the target. (OWL centres on the plain mean; in decoder-only
models every decoder layer has the same size, so the two are the same.)

Like the published method, the ratios come from the dense model: a pre-pass
(``pyprune.pipeline.prepass``) runs the calibration windows through the dense decoder layers
once and passes each Linear's input norms to ``prepass_observe``; only the diagonal of the
input second moment is accumulated, not a Hessian.
"""
import math
import time
from typing import Dict, List, Sequence

import torch

from pyprune.schedule.levels import weighted_mean
from pyprune.solvers.pattern import SparsityPattern

DEFAULT_M = 5.0
DEFAULT_LAMBDA = 0.08


def outlier_ratio(weights: Sequence[torch.Tensor], input_norms: Sequence[torch.Tensor], m: float = DEFAULT_M) -> float:
    """Fraction of the Wanda scores of all ``weights`` (``[out, in]`` each, with per-input norms
    ``[in]``) that exceed ``m`` times the mean score over all of them.

    Two passes (the sum, then the count) so only one Linear's scores exist at a time.
    """
    pairs = list(zip(weights, input_norms))
    for W, n in pairs:
        if n.numel() != W.shape[1]:
            raise ValueError(f"{n.numel()} input norms for a weight of shape {tuple(W.shape)}")
    # sum_ij |W_ij| n_j = sum_j n_j * (column sum of |W|)
    total = sum(float((W.float().abs().sum(0, dtype=torch.float64) * n.double().to(W.device)).sum()) for W, n in pairs)
    count = sum(W.numel() for W, _ in pairs)
    threshold = m * total / count
    return sum(int((W.float().abs() * n.float().reshape(1, -1).to(W.device) > threshold).sum())
               for W, n in pairs) / count


def owl_sparsities(ratios: Sequence[float], params: Sequence[float], target: float,
                   lam: float = DEFAULT_LAMBDA) -> List[float]:
    """OWL's per-layer sparsities from outlier ratios (see the module docstring)."""
    if len(ratios) != len(params) or not ratios:
        raise ValueError(f"need one parameter count per layer ({len(ratios)} ratios, {len(params)} counts)")
    lo, hi = min(ratios), max(ratios)
    if hi - lo <= 1e-12 * max(abs(hi), 1.0):
        return [float(target)] * len(ratios)
    scaled = [2.0 * lam * (r - lo) / (hi - lo) for r in ratios]
    centre = weighted_mean(scaled, params)
    out = [target - (x - centre) for x in scaled]
    bad = [(i, s) for i, s in enumerate(out) if not 0.0 <= s < 1.0]
    if bad:
        raise ValueError(f"OWL with target {target} and lambda {lam} gives sparsities outside [0, 1) "
                         f"for layers {bad}; lower lambda")
    return out


class OWLSchedule:
    name = "owl"
    needs_statistics = True
    prepass_statistics = "input_norms"

    def __init__(self, target, m: float = DEFAULT_M, lam: float = DEFAULT_LAMBDA):
        if not isinstance(target, SparsityPattern):
            target = SparsityPattern(sparsity=float(target))
        if target.is_nm:
            raise ValueError(f"schedule 'owl' gives each layer its own unstructured sparsity, but the target "
                             f"{target} is an N:M pattern (fixed sparsity); use the uniform schedule for N:M patterns")
        if not (math.isfinite(m) and m > 0):
            raise ValueError(f"OWL M={m}: need a finite value > 0")
        if not (math.isfinite(lam) and 0 <= lam < 0.5):
            raise ValueError(f"OWL lambda={lam}: need a value in [0, 0.5)")
        if not (2 * lam <= target.sparsity < 1.0 - 2 * lam):
            # Sparsities end within target +- 2*lam; refuse before any work what cannot fit.
            raise ValueError(f"OWL with target {target.sparsity} and lambda {lam} could leave [0, 1): "
                             f"need 2*lambda <= target < 1 - 2*lambda")
        self.target, self.m, self.lam = target, float(m), float(lam)
        self.layers: List[Dict] = []  # {"layer", "parameters", "outlier_ratio", "sparsity"}
        self.planned = False
        # Wall seconds of the dense pre-pass (outlier ratios included, also shown alone) and of
        # the allocation; "total" is the scheduler's whole cost.
        self.seconds = {"prepass": 0.0, "prepass_estimates": 0.0, "plan": 0.0, "total": 0.0}

    def config(self) -> dict:
        return {"schedule": self.name, "target": str(self.target), "m": self.m, "lambda": self.lam}

    def needs_prepass(self) -> bool:
        return not self.planned

    def prepass_observe(self, layer_index, norms_by_name, weights_by_name, residual_energy=None):
        if layer_index == 0:
            self.layers = []
        t0 = time.time()
        names = list(weights_by_name)
        ratio = outlier_ratio([weights_by_name[n] for n in names], [norms_by_name[n] for n in names], self.m)
        params = sum(weights_by_name[n].numel() for n in names)
        self.layers.append({"layer": layer_index, "parameters": params, "outlier_ratio": ratio, "sparsity": None})
        self.seconds["prepass_estimates"] += time.time() - t0

    def finish_prepass(self, seconds: float = 0.0):
        if not self.layers:
            raise ValueError("the pre-pass saw no layers; nothing to schedule")
        t0 = time.time()
        sparsities = owl_sparsities([e["outlier_ratio"] for e in self.layers],
                                    [e["parameters"] for e in self.layers], self.target.sparsity, self.lam)
        for entry, s in zip(self.layers, sparsities):
            entry["sparsity"] = s
        self.planned = True
        self.seconds["prepass"] += seconds
        self.seconds["plan"] += time.time() - t0
        self.seconds["total"] += seconds + self.seconds["plan"]

    def observe(self, layer_index, stats_by_name, weights_by_name):
        pass  # OWL allocates from the dense model only

    def pattern_for(self, layer_index: int, name: str) -> SparsityPattern:
        if not self.planned:
            raise RuntimeError("the owl schedule has no plan yet: run the dense pre-pass "
                               "(pyprune.pipeline.prepass.run_prepass) before pruning")
        if not 0 <= layer_index < len(self.layers):
            raise KeyError(f"layer {layer_index} was not seen by the pre-pass ({len(self.layers)} layers)")
        return SparsityPattern(sparsity=self.layers[layer_index]["sparsity"])

    def describe(self) -> dict:
        out = dict(self.config(), seconds=dict(self.seconds))
        if self.planned:
            out["mean_sparsity"] = weighted_mean([e["sparsity"] for e in self.layers],
                                                 [e["parameters"] for e in self.layers])
            out["units"] = [dict(e, name=None) for e in self.layers]
        return out

    def state(self) -> dict:
        return {"config": self.config(), "layers": self.layers, "planned": self.planned, "seconds": self.seconds}

    def restore(self, state: dict):
        if not state or not state.get("planned"):
            return
        if state.get("config") != self.config():
            raise ValueError(f"saved schedule state {state.get('config')} does not match {self.config()}")
        self.layers = [dict(e) for e in state["layers"]]
        self.planned = True
        self.seconds = dict(state.get("seconds") or self.seconds)
