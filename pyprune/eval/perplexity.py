"""Perplexity over non-overlapping windows: ``exp(mean token NLL)``."""
import math
import time
from typing import Optional

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@torch.no_grad()
def perplexity(model, stream: torch.Tensor, seqlen: int = 2048, max_windows: Optional[int] = None,
               device=None, progress: bool = True) -> dict:
    """Perplexity of ``model`` on a ``[1, n]`` token stream cut into windows of ``seqlen``.

    Every window is complete, so the mean over windows of the per-window mean NLL is the mean
    token NLL. Returns ``{"ppl", "nll", "windows", "tokens", "seconds"}``.
    """
    device = device or next(model.parameters()).device
    total = stream.shape[1] // seqlen
    windows = total if max_windows is None else min(total, max_windows)
    if windows < 1:
        raise ValueError(f"the evaluation text has {stream.shape[1]} tokens, fewer than one window of {seqlen}")
    start = time.time()
    nll_sum = 0.0
    for i in tqdm(range(windows), desc="perplexity", disable=not progress, leave=False):
        batch = stream[:, i * seqlen:(i + 1) * seqlen].to(device)
        logits = model(input_ids=batch, use_cache=False).logits
        nll = F.cross_entropy(logits[0, :-1].float(), batch[0, 1:], reduction="mean")
        nll_sum += nll.item()
    nll = nll_sum / windows
    return {
        "ppl": math.exp(nll),
        "nll": nll,
        "windows": windows,
        "tokens": windows * seqlen,
        "seqlen": seqlen,
        "seconds": time.time() - start,
    }
