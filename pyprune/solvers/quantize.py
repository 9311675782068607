"""Entry points for INT4: quantize one Linear after (or instead of) pruning, or prune and quantize
in one SparseGPT sweep.

``quantize_layer(W, stats, method="gptq"|"rtn", groupsize=128, act_order=False, pruned=mask)``
is what a pipeline calls per Linear after any pruning solver (pass its mask as ``pruned``; the
mask comes back bit-identical) or with ``pruned=None`` for quantization only.
``prune_and_quantize(W, stats, pattern, groupsize=128)`` is the joint SparseGPT + INT4 path.
"""
from typing import Optional

import torch

from pyprune.ops import int4_grid, int4_refine
from pyprune.ops.obs_sweep import QuantSpec
from pyprune.ops.teacher import teacher_target
from pyprune.solvers import gptq, rtn, sparsegpt
from pyprune.solvers.base import LayerStats, SolverResult
from pyprune.solvers.compressed_size import StorageCost, layer_storage, total_storage
from pyprune.solvers.pattern import SparsityPattern
from pyprune.solvers.quant_result import QuantCodes, QuantResult, make_result

QUANTIZERS = {"rtn": rtn.solve, "gptq": gptq.solve}
REFINE_TARGETS = ("original", "pruned")  # what GPTQ's refinement after a pruning solver aims at

__all__ = [
    "QUANTIZERS", "LayerQuantizer", "QuantCodes", "QuantResult", "no_pruning", "prune_and_quantize",
    "quantize_layer", "sparsegpt_int4_solver",
]


def quantize_layer(
    W: torch.Tensor,
    stats: Optional[LayerStats],
    *,
    method: str = "gptq",
    groupsize: int = 128,
    act_order: bool = False,
    pruned: Optional[torch.Tensor] = None,
    **options,
) -> QuantResult:
    """INT4-quantize ``W`` ([out, in]); keeps ``pruned`` (True = removed) at exactly zero.

    ``options`` go to the quantizer (both: ``scale_fit``; gptq: ``refine_rounds``, ``damp``,
    ``blocksize``).
    ``act_order`` and ``refine_rounds`` are GPTQ options; RTN rejects them rather than silently
    ignoring them.
    """
    if method not in QUANTIZERS:
        raise ValueError(f"unknown quantization method {method!r}; allowed: {', '.join(sorted(QUANTIZERS))}")
    if act_order and method != "gptq":
        raise ValueError(f"act_order is a GPTQ option; method={method!r} does not support it")
    if options.get("refine_rounds") and method != "gptq":
        raise ValueError(f"refine_rounds is a GPTQ option; method={method!r} does not support it")
    if W.dim() != 2:
        raise ValueError(f"W must be a 2-D weight matrix [out, in], got shape {tuple(W.shape)}")
    return QUANTIZERS[method](W, stats, groupsize=groupsize, act_order=act_order, pruned=pruned, **options)


def prune_and_quantize(
    W: torch.Tensor,
    stats: LayerStats,
    pattern: SparsityPattern,
    *,
    groupsize: int = 128,
    scale_fit: str = "minmax",
    refine_rounds: int = 0,
    damp: float = 0.01,
    blocksize: int = 128,
) -> QuantResult:
    """SparseGPT + INT4 in one OBS sweep: each frozen column is pruned by the adaptive mask, its
    kept weights quantized (group scales fitted on kept weights when the sweep reaches the group),
    and the combined error compensated into the columns not frozen yet. ``refine_rounds`` then
    refines codes and scales on the final mask (``pyprune.ops.int4_refine``)."""
    g = int4_grid.check_groupsize(groupsize, W.shape[1])
    int4_grid.check_scale_fit(scale_fit)
    int4_refine.check_rounds(refine_rounds)
    # float32 in, so the solver's output stays exactly on the grid (fp16 would round scale * q).
    result = sparsegpt.solve(W.float(), stats, pattern, damp=damp, blocksize=blocksize,
                             quant=QuantSpec(groupsize=g, scale_fit=scale_fit))
    weight, scales = result.weight, result.info["scales"]
    info = {key: value for key, value in result.info.items() if key != "scales"}
    info.update(method="sparsegpt+gptq", pattern=str(pattern), scale_fit=scale_fit)
    if refine_rounds:
        weight, scales, refined = int4_refine.refine_weight(W, weight, scales, g, stats.H, result.info["damp"],
                                                            result.pruned, refine_rounds)
        info.update(refined)
    return make_result(W, weight, scales, result.pruned, g, stats.H.to(W.device), info)


def no_pruning(W: torch.Tensor, stats: Optional[LayerStats] = None, pattern: SparsityPattern = None, **_) -> SolverResult:
    """The solver for ``--method none``: keeps every weight (quantization only)."""
    return SolverResult(W.clone(), torch.zeros(W.shape, dtype=torch.bool, device=W.device), 0.0, {})


no_pruning.statistics = None  # only the quantizer (if it is GPTQ) reads calibration statistics


def sparsegpt_int4_solver(groupsize: int = 128, scale_fit: str = "minmax", refine_rounds: int = 0):
    """A solver (``solve(W, stats, pattern, **options) -> SolverResult``) running the joint
    SparseGPT + INT4 sweep; its result carries the :class:`QuantResult` as
    ``info["quant_result"]`` for :class:`LayerQuantizer` to record without quantizing again.
    The weight is float32 (exactly on the grid)."""

    def solve(W, stats, pattern, *, damp=0.01, blocksize=128, **_):
        q = prune_and_quantize(W, stats, pattern, groupsize=groupsize, scale_fit=scale_fit,
                               refine_rounds=refine_rounds, damp=damp, blocksize=blocksize)
        info = dict(q.info, quant_result=q)
        return SolverResult(q.weight, q.pruned, q.loss, info)

    solve.joint_int4 = True  # pruning and INT4 in one sweep: no pruned, unquantized weight exists
    return solve


# Dampening of the teacher target's solve, x mean diag H (pyprune.ops.teacher).
DEFAULT_TEACHER_DAMP = 1.0


class LayerQuantizer:
    """Quantizes each Linear right after its pruning solver (``post_solve`` hook).

    ``quantizer(name, W_pruned, solver_result, stats) -> (weight, report_fields)``: runs
    :func:`quantize_layer` with the solver's mask (kept bit-identical), or, when the solver was the
    joint sweep (``info["quant_result"]``), takes its result as is. The codes, scales and mask of
    every Linear are kept (on CPU, as :class:`QuantCodes`) in ``self.results[name]`` for the
    sidecar (``pyprune.formats.quant_state``) and the INT4 modules (``quant_state=``).
    ``nm=(n, m)`` makes the storage accounting use the N:M layout. ``refine_target="original"`` (the
    default) aims GPTQ's refinement at the weight before pruning (the hook's ``original``), the
    weight every layer error is measured against, so kept codes also take up the pruning solver's
    error; ``"pruned"`` aims it at the solver's output.

    Statistics with a teacher cross term (``stats.cross``: the runner's teacher calibration) make
    GPTQ aim at the teacher's outputs: the sweep at the teacher target of the pruned weight, the
    refinement at that of its own target (``pyprune.ops.teacher``, solved with ``teacher_damp`` x
    mean diag H).
    """

    needs_statistics = True

    def __init__(self, method: str = "gptq", groupsize: int = 128, act_order: bool = False,
                 nm: Optional[tuple] = None, refine_target: str = "original",
                 teacher_damp: float = DEFAULT_TEACHER_DAMP, **options):
        if method not in QUANTIZERS:
            raise ValueError(f"unknown quantization method {method!r}; allowed: {', '.join(sorted(QUANTIZERS))}")
        if refine_target not in REFINE_TARGETS:
            raise ValueError(f"refine_target={refine_target!r}; allowed: {', '.join(REFINE_TARGETS)}")
        if not teacher_damp > 0:
            raise ValueError(f"teacher_damp={teacher_damp!r}: must be > 0 (it keeps the target's solve regular)")
        self.method, self.groupsize, self.act_order, self.nm = method, groupsize, act_order, nm
        self.refine_target, self.teacher_damp = refine_target, teacher_damp
        self.options = options
        self.needs_statistics = method != "rtn"
        self.results = {}

    def __call__(self, name, W_pruned, solver_result, stats, original=None):
        q = solver_result.info.get("quant_result")
        teacher = stats is not None and stats.cross is not None
        if q is not None and teacher:
            raise ValueError(f"{name}: the joint SparseGPT + INT4 sweep cannot be calibrated against a teacher")
        teacher_fields = {}
        if q is None:
            options = dict(self.options)
            if self.refine_target == "original" and original is not None and self.method == "gptq":
                options["refine_target"] = original
            target = W_pruned
            if teacher:
                # The target is linear in the weight, row by row: one solve serves both weights.
                bases = [W_pruned] + ([options["refine_target"]] if "refine_target" in options else [])
                targets = teacher_target(torch.cat([b.float() for b in bases]), stats.H, stats.cross,
                                         self.teacher_damp).split(W_pruned.shape[0])
                target = targets[0]
                if len(targets) > 1:
                    options["refine_target"] = targets[1]
                shift = (target - W_pruned.float()).norm() / W_pruned.float().norm().clamp_min(1e-30)
                teacher_fields = {"teacher_damp": self.teacher_damp, "teacher_target_shift": float(shift)}
            q = quantize_layer(target, stats, method=self.method, groupsize=self.groupsize,
                               act_order=self.act_order, pruned=solver_result.pruned, **options)
            if not torch.equal(q.pruned, solver_result.pruned):
                raise AssertionError(f"{name}: quantization changed the sparsity mask")
        self.results[name] = q.codes("cpu")
        cost = layer_storage(q.qweight.shape, wbits=4, groupsize=q.groupsize, pruned=q.pruned, nm=self.nm)
        fields = {
            "wbits": 4,
            "groupsize": self.groupsize,
            "quant_method": q.info.get("method", self.method),
            "act_order": bool(q.info.get("act_order", False)),
            "scale_fit": q.info.get("scale_fit", "minmax"),
            "refine_rounds": q.info.get("refine_rounds", 0),
            "quant_loss": q.loss,
            "quant_rel_error": q.info.get("rel_error", float("nan")),
            "bits_per_weight": cost.bits_per_weight,
            "compressed_bytes": cost.nbytes,
            "storage_layout": cost.layout,
        }
        if "refine_loss_ratio" in q.info:
            fields["refine_loss_ratio"] = q.info["refine_loss_ratio"]
        if "damp" in q.info:  # GPTQ's, after a possible retry; the pruning solver's stays "damp"
            fields["quant_damp"] = q.info["damp"]
        fields.update(teacher_fields)
        return q.weight, fields

    def set_scales(self, name: str, scales: torch.Tensor) -> torch.Tensor:
        """Give ``name``'s codes new group scales (same shape, fp16-exact, nonzero: block-wise
        tuning, ``pipeline.scale_tuning``); returns the float32 weight they dequantize to."""
        q = self.results[name]
        if tuple(scales.shape) != tuple(q.scales.shape):
            raise ValueError(f"{name}: scales must have shape {tuple(q.scales.shape)}, got {tuple(scales.shape)}")
        int4_grid.check_scales(scales)
        self.results[name] = QuantCodes(q.qweight, scales.float().cpu(), q.pruned, q.groupsize)
        return self.results[name].dequantize()

    def storage(self) -> StorageCost:
        """Total storage of every Linear quantized so far."""
        return total_storage(
            layer_storage(q.qweight.shape, wbits=4, groupsize=q.groupsize, pruned=q.pruned, nm=self.nm)
            for q in self.results.values()
        )
