"""Forward hooks that fold each Linear's inputs into its Hessian while a layer runs.

Linears that read the same tensor (q/k/v, gate/up) would compute the same ``x^T x``: within a
batch, the first of them accumulates and the others, having seen exactly the same inputs so far,
copy its Hessian instead of recomputing it.

With ``stop_when_complete`` the collector ends the layer's forward (by raising
:class:`StatisticsComplete`) as soon as every Linear has seen its input for the batch: the last
Linear's product and whatever follows it are not needed for statistics (the layer runs again with
the pruned weights to produce the next layer's inputs).
"""
import torch

from pyprune.models.families import weight_matrix
from pyprune.ops.hessian import accumulate_hessian
from pyprune.solvers.base import LayerStats


class StatisticsComplete(Exception):
    """Raised from a hook once every Linear has seen the batch (``stop_when_complete``)."""


class HessianCollector:
    """Context manager: ``stats[name]`` holds each Linear's :class:`LayerStats`."""

    def __init__(self, linears, device, stop_when_complete: bool = False):
        self.linears = dict(linears)
        self.stop_when_complete = stop_when_complete
        self._seen = set()
        self.stats = {}
        for name, module in self.linears.items():
            cols = weight_matrix(module).shape[1]
            self.stats[name] = LayerStats(torch.zeros(cols, cols, dtype=torch.float32, device=device), 0)
        self._handles = []
        self._owner_of_input = {}

    def __enter__(self):
        for name, module in self.linears.items():
            self._handles.append(module.register_forward_pre_hook(self._hook(name)))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._owner_of_input.clear()

    def new_batch(self):
        """Call before each batch: input identities are only meaningful within one batch."""
        self._owner_of_input.clear()
        self._seen.clear()

    def _hook(self, name):
        def hook(module, inputs):
            self._accumulate(name, inputs[0])
            self._seen.add(name)
            if self.stop_when_complete and len(self._seen) == len(self.linears):
                raise StatisticsComplete
        return hook

    def _accumulate(self, name, source):
        x = source.detach().reshape(-1, source.shape[-1])
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
