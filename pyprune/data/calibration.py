"""Token windows for calibration and evaluation.

Calibration: the documents joined with ``"\\n\\n"``, tokenized once, ``nsamples`` windows of
``seqlen`` tokens at offsets drawn from ``random.Random(seed)`` (the same stream as
``random.seed(seed); random.randint(0, n - seqlen - 1)``).
Evaluation: the WikiText-2 test rows joined with ``"\\n\\n"``, tokenized once, cut into
non-overlapping windows of ``seqlen`` tokens.
"""
import random
from typing import Optional

import torch

from pyprune.data.text import load_texts


def tokenize_joined(tokenizer, texts) -> torch.Tensor:
    """``[1, n]`` token ids of all texts joined with blank lines."""
    return tokenizer("\n\n".join(texts), return_tensors="pt").input_ids


def sample_windows(stream: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """``[nsamples, seqlen]`` windows of a ``[1, n]`` token stream at seeded random offsets."""
    n = stream.shape[1]
    if n <= seqlen + 1:
        raise ValueError(f"the calibration text has {n} tokens, too few for windows of seqlen={seqlen}")
    rng = random.Random(seed)
    starts = [rng.randint(0, n - seqlen - 1) for _ in range(nsamples)]
    return torch.stack([stream[0, s:s + seqlen] for s in starts])


def calibration_tokens(tokenizer, dataset: str, nsamples: int, seqlen: int, seed: int,
                       data_dir: Optional[str]) -> torch.Tensor:
    check_window_args(nsamples, seqlen)
    split = "train" if dataset == "c4" else "train" if data_dir is None else "validation"
    stream = tokenize_joined(tokenizer, load_texts(dataset, split, data_dir))
    return sample_windows(stream, nsamples, seqlen, seed)


def evaluation_tokens(tokenizer, data_dir: Optional[str], split: str = "test") -> torch.Tensor:
    """``[1, n]`` token stream of the WikiText-2 split used for perplexity."""
    return tokenize_joined(tokenizer, load_texts("wikitext2", split, data_dir))


def check_window_args(nsamples: int, seqlen: int):
    if nsamples < 1:
        raise ValueError(f"nsamples={nsamples}: need at least 1 calibration window")
    if seqlen < 2:
        raise ValueError(f"seqlen={seqlen}: need at least 2 tokens per window")
