"""Per-weight tile counters for split-K products summed inside the matmul kernel.

With ``KernelConfig.reduce_in_kernel`` the programs of an output tile count themselves done on an
int32 counter (see ``_common.store_result``); the last one sums the tile's partials, writes the
output and sets the counter back to zero, so the counters are zero again when the kernel ends and
need no clearing launch. They must not be shared with a kernel running at the same time, so each
packed weight has its own (4 bytes per output row, freed with the weight); a weight's products
run one after another on its stream. Counters are created outside CUDA graph capture only (a
buffer zeroed inside a capture is zero only once the graph has run): a captured launch for a
weight that has none falls back to the separate reduction.
"""
import torch

from .tensor_keyed import TensorKeyed

_COUNTERS = TensorKeyed()  # packed weight -> its counters


def for_weight(weight: torch.Tensor, rows: int, tiles: int):
    """Zeroed int32 counters (``rows`` of them: one per output row is enough for every decode
    tile) for the products with ``weight``, or None where this launch cannot use them: more
    ``tiles`` than counters, or none yet while a CUDA graph is being captured."""
    counters = _COUNTERS.value(weight)
    if counters is None:
        if weight.is_cuda and torch.cuda.is_current_stream_capturing():
            return None
        counters = _COUNTERS.keep(weight, torch.zeros(max(rows, 1), dtype=torch.int32, device=weight.device))
    return counters if tiles <= counters.numel() else None
