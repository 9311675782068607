"""Entry points for INT4: quantize one Linear after (or instead of) pruning, or prune and quantize
in one SparseGPT sweep.

``quantize_layer(W, stats, method="gptq"|"rtn", groupsize=128, act_order=False, pruned=mask)``
is what a pipeline calls per Linear after any pruning solver (pass its mask as ``pruned``; the
mask comes back bit-identical) or with ``pruned=None`` for quantization only.
``prune_and_quantize(W, stats, pattern, groupsize=128)`` is the joint SparseGPT + INT4 path.
"""
from typing import Optional

import torch

from pyprune.ops import int4_grid
from pyprune.ops.obs_sweep import QuantSpec
from pyprune.solvers import gptq, rtn, sparsegpt
from pyprune.solvers.base import LayerStats
from pyprune.solvers.pattern import SparsityPattern
from pyprune.solvers.quant_result import QuantResult, make_result

QUANTIZERS = {"rtn": rtn.solve, "gptq": gptq.solve}


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

    ``options`` go to the quantizer (gptq: ``damp``, ``blocksize``). ``act_order`` is a GPTQ
    option; RTN rejects it rather than silently ignoring it.
    """
    if method not in QUANTIZERS:
        raise ValueError(f"unknown quantization method {method!r}; allowed: {', '.join(sorted(QUANTIZERS))}")
    if act_order and method != "gptq":
        raise ValueError(f"act_order is a GPTQ option; method={method!r} does not support it")
    if W.dim() != 2:
        raise ValueError(f"W must be a 2-D weight matrix [out, in], got shape {tuple(W.shape)}")
    return QUANTIZERS[method](W, stats, groupsize=groupsize, act_order=act_order, pruned=pruned, **options)


def prune_and_quantize(
    W: torch.Tensor,
    stats: LayerStats,
    pattern: SparsityPattern,
    *,
    groupsize: int = 128,
    damp: float = 0.01,
    blocksize: int = 128,
) -> QuantResult:
    """SparseGPT + INT4 in one OBS sweep: each frozen column is pruned by the adaptive mask, its
    kept weights quantized (group scales fitted on kept weights when the sweep reaches the group),
    and the combined error compensated into the columns not frozen yet."""
    g = int4_grid.check_groupsize(groupsize, W.shape[1])
    # float32 in, so the solver's output stays exactly on the grid (fp16 would round scale * q).
    result = sparsegpt.solve(W.float(), stats, pattern, damp=damp, blocksize=blocksize, quant=QuantSpec(groupsize=g))
    info = {key: value for key, value in result.info.items() if key != "scales"}
    info.update(method="sparsegpt+gptq", pattern=str(pattern))
    return make_result(W, result.weight, result.info["scales"], result.pruned, g, stats.H.to(W.device), info)
