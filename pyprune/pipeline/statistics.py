"""Forward pre-hooks that fold each Linear's inputs into its statistics while a layer runs.

:class:`HessianCollector` keeps each Linear's Hessian; :class:`InputNormCollector` only its
diagonal (the per-input sums of squares), which is all that Wanda scores and OWL need:
``in_features`` numbers instead of ``in_features ** 2``.

``sink_weight`` counts the first token of every window (the attention sink: in most causal LMs
every later query attends to it, and its hidden state carries the massive activations) as
``sink_weight`` tokens. An error on that token's inputs reaches every position through its key
and value, while the plain Hessian weighs it as one token among ``seqlen``.

``sink_cap`` first shrinks that token's input row, where it is longer, to the median length of
the window's other rows. A Linear whose input carries a massive activation on the first token
(SmolLM2-135M's layer-11 down_proj: ~3,300 there, below ~15 elsewhere) otherwise has a Hessian
made of that one token, even at sink weight 1, and GPTQ then fits it alone: on held-out tokens
its error on every other token ended above RTN's. The CLI caps wherever the sink weight is above 1.

Linears that read the same tensor (q/k/v, gate/up) would compute the same ``x^T x``: within a
batch, the first of them accumulates and the others, having seen exactly the same inputs so far,
copy its Hessian instead of recomputing it.

Teacher calibration (``pyprune.ops.teacher``) pairs two forwards of the same windows:
:class:`InputRecorder` keeps each Linear's input in the teacher, then :class:`PairedCollector`
folds the model's own inputs into its Hessians plus their cross term with the teacher's.

With ``stop_when_complete`` the collector ends the layer's forward (by raising
:class:`StatisticsComplete`) as soon as every Linear has seen its input for the batch: the last
Linear's product and whatever follows it are not needed for statistics (the layer runs again with
the pruned weights to produce the next layer's inputs).
"""
from typing import Optional

import torch

from pyprune.models.families import weight_matrix
from pyprune.ops.hessian import accumulate_hessian, no_tf32
from pyprune.solvers.base import LayerStats


class StatisticsComplete(Exception):
    """Raised from a hook once every Linear has seen the batch (``stop_when_complete``)."""


# The CLI's default for sparsegpt and GPTQ. Under protocol P1 on SmolLM2-135M, 256 instead of 1
# took SparseGPT 50 % from 44.4 to 40.6 perplexity and GPTQ INT4 g64 from 36.9 (worse than RTN's
# 30.3) to 25.8; it did not help solvers whose masks follow input norms (ADMM-Grad 70 %: 168.0 ->
# 176.4; wanda in bench/results/sink_weight_quick.md), which keep 1.
SINK_WEIGHT = 256.0


def default_sink_weight(method: str, gptq: bool = False) -> float:
    """The sink weight a run uses when none is given: ``SINK_WEIGHT`` for sparsegpt and for GPTQ
    without pruning, 1 otherwise."""
    return SINK_WEIGHT if method == "sparsegpt" or (method == "none" and gptq) else 1.0


def sink_factors(source: torch.Tensor, sink_weight: float, sink_cap: bool = False):
    """``[batch]`` factors of the first position's outer product in each window of a
    ``[batch, seq, features]`` input: ``sink_weight``, with ``sink_cap`` first multiplied by
    ``median length^2 / its length^2`` where that is below 1; None where every factor is 1."""
    x = source.detach()
    if x.dim() != 3 or not (sink_weight != 1.0 or (sink_cap and x.shape[1] > 1)):
        return None
    factor = torch.full((x.shape[0],), float(sink_weight), dtype=torch.float32, device=x.device)
    if sink_cap and x.shape[1] > 1:
        energy = x.float().pow(2).sum(-1)  # [batch, seq]
        typical = energy[:, 1:].median(dim=1).values
        factor *= (typical / energy[:, 0].clamp_min(torch.finfo(torch.float32).tiny)).clamp(max=1.0)
    return factor


def sink_weighted_rows(source: torch.Tensor, sink_weight: float, sink_cap: bool = False,
                       factors: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``[tokens, features]`` rows of a ``[batch, seq, features]`` input, position 0 scaled by
    ``sqrt(sink_weight)`` (so its outer product counts ``sink_weight`` times); with ``sink_cap``
    first shrunk, where longer, to the median length of the other positions of its window.
    ``factors`` (from :func:`sink_factors`) overrides both: a teacher's rows take the factors of
    the rows they are paired with."""
    x = source.detach()
    if factors is None:
        factors = sink_factors(x, sink_weight, sink_cap)
    if factors is not None:
        x = x.clone()
        x[:, 0] *= factors.sqrt().to(x.dtype)[:, None]
    return x.reshape(-1, x.shape[-1])


def check_sink_weight(sink_weight: float) -> float:
    if not sink_weight >= 1.0:
        raise ValueError(f"sink_weight={sink_weight}: must be at least 1 (1 = the first token counts as one token)")
    return float(sink_weight)


class _InputHooks:
    """Context manager shared by the collectors: a forward pre-hook on every Linear hands its input
    to ``_accumulate(name, source)`` and, with ``stop_when_complete``, ends the forward once every
    Linear has seen the batch."""

    def __init__(self, linears, stop_when_complete: bool, sink_weight: float, sink_cap: bool = False):
        self.linears = dict(linears)
        self.stop_when_complete = stop_when_complete
        self.sink_weight = check_sink_weight(sink_weight)
        self.sink_cap = bool(sink_cap)
        self._seen = set()
        self._handles = []

    def __enter__(self):
        for name, module in self.linears.items():
            self._handles.append(module.register_forward_pre_hook(self._hook(name)))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.new_batch()

    def new_batch(self):
        """Call before each batch."""
        self._seen.clear()

    def _hook(self, name):
        def hook(module, inputs):
            self._accumulate(name, inputs[0])
            self._seen.add(name)
            if self.stop_when_complete and len(self._seen) == len(self.linears):
                raise StatisticsComplete
        return hook

    def _accumulate(self, name, source):
        raise NotImplementedError


class HessianCollector(_InputHooks):
    """Context manager: ``stats[name]`` holds each Linear's :class:`LayerStats`."""

    def __init__(self, linears, device, stop_when_complete: bool = False, sink_weight: float = 1.0,
                 sink_cap: bool = False):
        super().__init__(linears, stop_when_complete, sink_weight, sink_cap)
        self.stats = {}
        for name, module in self.linears.items():
            cols = weight_matrix(module).shape[1]
            self.stats[name] = LayerStats(torch.zeros(cols, cols, dtype=torch.float32, device=device), 0)
        self._owner_of_input = {}

    def new_batch(self):
        """Call before each batch: input identities are only meaningful within one batch."""
        super().new_batch()
        self._owner_of_input.clear()

    def _accumulate(self, name, source):
        self._fold(name, source, sink_weighted_rows(source, self.sink_weight, self.sink_cap))

    def _fold(self, name, source, x):
        """Fold the rows ``x`` of ``source`` into ``stats[name].H``."""
        stats = self.stats[name]
        key = (source.data_ptr(), tuple(source.shape), source.stride(), source.dtype, source.device)
        owner = self._owner_of_input.get(key)
        if owner is not None and owner[1] is source and owner[0].nsamples == stats.nsamples + x.shape[0]:
            stats.H.copy_(owner[0].H)
            stats.nsamples = owner[0].nsamples
            return
        stats.nsamples = accumulate_hessian(stats.H, stats.nsamples, x)
        # Keeping ``source`` referenced until the batch ends stops its memory from being
        # reused by a different tensor at the same address within this batch.
        self._owner_of_input[key] = (stats, source)


class InputRecorder(_InputHooks):
    """Context manager: ``inputs[name]``, each Linear's input of the current batch (the teacher's
    side of :class:`PairedCollector`)."""

    def __init__(self, linears, stop_when_complete: bool = False):
        super().__init__(linears, stop_when_complete, 1.0)
        self.inputs = {}

    def new_batch(self):
        super().new_batch()
        self.inputs = {}

    def _accumulate(self, name, source):
        self.inputs[name] = source.detach()


class PairedCollector(HessianCollector):
    """Context manager: each Linear's Hessian and, in ``stats[name].cross``, the running mean
    ``(2/n) sum x~ x^T`` of the teacher's input ``x~`` (``teacher[name]``, recorded on the same
    windows) against its own ``x``. Both rows carry the first position's factor of the own rows."""

    def __init__(self, linears, device, teacher: dict, stop_when_complete: bool = False,
                 sink_weight: float = 1.0, sink_cap: bool = False):
        super().__init__(linears, device, stop_when_complete, sink_weight, sink_cap)
        self.teacher = teacher
        for stats in self.stats.values():
            stats.cross = torch.zeros_like(stats.H)

    def _accumulate(self, name, source):
        theirs = self.teacher.get(name)
        if theirs is None or theirs.shape != source.shape:
            raise RuntimeError(f"{name}: the teacher's input for this batch is missing or has another shape "
                               "(record the teacher on the same windows first)")
        stats = self.stats[name]
        before = stats.nsamples
        factors = sink_factors(source, self.sink_weight, self.sink_cap)
        x = sink_weighted_rows(source, self.sink_weight, factors=factors)
        self._fold(name, source, x)
        x = x.float()
        x_teacher = sink_weighted_rows(theirs.to(source.device), self.sink_weight, factors=factors).float()
        with no_tf32():
            stats.cross.mul_(before / stats.nsamples)
            stats.cross.addmm_(x_teacher.t(), x, alpha=2.0 / stats.nsamples)


class InputNormCollector(_InputHooks):
    """Context manager: per-input sums of squares of each Linear's inputs (float64).

    ``stats[name]`` is a :class:`LayerStats` with only ``diagonal`` (= the Hessian's diagonal,
    ``(2/n) sum x_j^2``); ``rms[name]`` is ``sqrt(mean x_j^2)``.
    """

    def __init__(self, linears, device, stop_when_complete: bool = False, sink_weight: float = 1.0,
                 sink_cap: bool = False):
        super().__init__(linears, stop_when_complete, sink_weight, sink_cap)
        self._sums = {name: torch.zeros(weight_matrix(m).shape[1], dtype=torch.float64, device=device)
                      for name, m in self.linears.items()}
        self._counts = {name: 0 for name in self.linears}

    def _accumulate(self, name, source):
        x = sink_weighted_rows(source, self.sink_weight, self.sink_cap)
        self._sums[name] += x.double().pow(2).sum(0).to(self._sums[name].device)
        self._counts[name] += x.shape[0]

    @property
    def stats(self):
        return {name: LayerStats(None, self._counts[name], diagonal=(2.0 * s / max(self._counts[name], 1)).float())
                for name, s in self._sums.items()}

    @property
    def rms(self):
        return {name: (s / max(self._counts[name], 1)).sqrt().float() for name, s in self._sums.items()}
