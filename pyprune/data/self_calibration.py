"""Calibration text sampled from the dense model itself, so pruning needs no dataset.

Self-calibration (Williams, Chrysostomou & Aletras, NAACL 2025) generates the calibration inputs
with the model before it is compressed, starting from no context; LLM-QAT (Liu et al., 2023) uses
the same idea for data-free quantization. Both found that full stochastic sampling is needed:
greedy decoding collapses into a few repetitive texts, and the goal is to approximate the
distribution the model was trained on, not its single most likely text.

Choices made here (all documented in the returned ``info``):

- **Sampling**: temperature 1.0 and no nucleus cut (top-p 1.0): the model's own distribution,
  which is what the calibration statistics should describe. Narrowing it made calibration worse
  under P1 on SmolLM2-135M: cutting the tail at top-p 0.95 (Holtzman et al., 2020) raised the
  pruned perplexity by 3 % (SparseGPT 50 %, 2:4), temperature 0.8 by far more (README,
  self-calibration). ``top_p`` < 1 is available. Greedy (temperature 0) is refused: every sample
  would be the same text.
- **Start**: every row begins with the BOS token (from the tokenizer, else the model config), or
  with a short neutral text prefix when neither defines one. The prefix is part of the row, so a
  row is exactly the sequence the model saw while generating it.
- **EOS**: by default (``on_eos="continue"``) an end-of-sequence token is kept and sampling goes on,
  so the model starts a new document after it. That is how pre-training data (packed documents
  separated by EOS) and the C4 windows used for calibration look, and it keeps every row at
  exactly ``seqlen`` real tokens with no padding. ``on_eos="suppress"`` instead forbids EOS and
  forces one continuous document per row.
- **Determinism**: all randomness comes from one CPU generator seeded with ``seed``, which draws
  one uniform number per output token up front (row ``i`` always gets the same numbers). Tokens
  are drawn by inverse-CDF sampling from those numbers, so the result does not depend on
  ``batch_size`` or on the device's random number generator; only floating-point differences
  between devices or batch shapes can change a draw that falls right on a probability boundary.
"""
import time
from typing import Optional, Sequence, Union

import torch

DEFAULT_TEMPERATURE = 1.0
DEFAULT_TOP_P = 1.0
DEFAULT_BATCH_SIZE = 8
# Long samples drift into repetition: under P1 on SmolLM2-135M, sixteen 128-token samples per
# 2048-token window calibrated as well as or better than four of 512 tokens, which beat one of 2048
# (README, self-calibration).
DEFAULT_SAMPLE_LEN = 128
# Used only when neither the tokenizer nor the model config has a BOS token.
NEUTRAL_PREFIX = "\n"
EOS_MODES = ("continue", "suppress")


def sample_next_token(logits: torch.Tensor, uniforms: torch.Tensor, temperature: float,
                      top_p: float) -> torch.Tensor:
    """Draw one token per row by inverse-CDF sampling from the temperature/top-p distribution.

    ``logits``: ``[B, V]``; ``uniforms``: ``[B]`` numbers in ``[0, 1)``. Returns ``[B]`` token ids.
    The nucleus is the smallest set of most likely tokens whose mass reaches ``top_p``.
    """
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    # Stable sort: equal probabilities keep a fixed order, so a seed always gives the same token.
    sorted_p, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    mass_before = sorted_p.cumsum(dim=-1) - sorted_p
    keep = mass_before < top_p  # always keeps the most likely token
    sorted_p = sorted_p * keep
    cdf = sorted_p.cumsum(dim=-1)
    target = uniforms.to(device=cdf.device, dtype=cdf.dtype).unsqueeze(-1) * cdf[:, -1:]
    pos = torch.searchsorted(cdf, target, right=True)
    # Rounding can put the target at the very top of the kept mass: stay inside the nucleus.
    pos = torch.minimum(pos, keep.sum(dim=-1, keepdim=True) - 1)
    return order.gather(-1, pos).squeeze(-1)


def sampling_uniforms(seed: int, nsamples: int, seqlen: int) -> torch.Tensor:
    """The ``[nsamples, seqlen]`` float64 uniforms that drive sampling for ``seed``."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.rand(nsamples, seqlen, generator=gen, dtype=torch.float64)


def _config_value(model, name):
    for cfg in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        value = getattr(cfg, name, None) if cfg is not None else None
        if value is not None:
            return value
    return None


def _as_id_list(value) -> list:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def resolve_prefix(model, tokenizer, prefix) -> list:
    """The token ids every row starts with (see the module docstring for the default)."""
    if prefix is None:
        bos = getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else None
        if bos is None:
            bos = getattr(getattr(model, "config", None), "bos_token_id", None)
        if bos is not None:
            return _as_id_list(bos)[:1]
        if tokenizer is None:
            raise ValueError(
                "self-calibration needs a start token: the model config has no bos_token_id and no "
                "tokenizer was given; pass a tokenizer or prefix=[token ids]")
        prefix = NEUTRAL_PREFIX
    if isinstance(prefix, str):
        if tokenizer is None:
            raise ValueError(f"prefix={prefix!r} is text, which needs a tokenizer; pass a tokenizer "
                             "or prefix as a list of token ids")
        ids = list(tokenizer.encode(prefix, add_special_tokens=False))
    elif isinstance(prefix, torch.Tensor):
        ids = [int(v) for v in prefix.flatten().tolist()]
    else:
        ids = [int(v) for v in prefix]
    if not ids:
        raise ValueError(f"prefix={prefix!r} gives no tokens; it must give at least one")
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    bad = [i for i in ids if i < 0 or (vocab is not None and i >= vocab)]
    if bad:
        raise ValueError(f"prefix token ids {bad} are outside the vocabulary [0, {vocab})")
    return ids


def check_generation_args(nsamples, seqlen, seed=0, temperature=DEFAULT_TEMPERATURE,
                          top_p=DEFAULT_TOP_P, batch_size=DEFAULT_BATCH_SIZE, on_eos="continue",
                          sample_len=None):
    """Raise ValueError naming the first bad argument (cheap: call it before loading a model)."""
    for name, value in (("nsamples", nsamples), ("seqlen", seqlen), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} is not allowed: it must be a positive integer")
    if sample_len is not None and (isinstance(sample_len, bool) or not isinstance(sample_len, int)
                                   or sample_len < 2 or seqlen % sample_len):
        raise ValueError(f"sample_len={sample_len!r} is not allowed: it must be an integer of at least 2 "
                         f"that divides seqlen={seqlen}")
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"temperature={temperature!r} is not allowed: it must be > 0 (greedy "
                         "decoding would make every calibration sample the same text)")
    if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"top_p={top_p!r} is not allowed: it must be in (0, 1]")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed={seed!r} is not allowed: it must be an integer")
    if on_eos not in EOS_MODES:
        raise ValueError(f"on_eos={on_eos!r} is not allowed: choose one of {EOS_MODES}")


def preallocated_cache(model, capacity: int):
    """A KV cache whose full-attention layers write into buffers of ``capacity`` positions.

    The default cache concatenates every step, copying the whole cache each time: O(seqlen^2)
    memory traffic, which dominated CPU generation of 2048-token rows (two thirds of the time).
    Layers of other kinds (sliding window) are kept as the library makes them. Returns None when
    this ``transformers`` version does not build its cache from per-layer objects; the model then
    makes its own cache.
    """
    try:
        from transformers.cache_utils import DynamicCache, DynamicLayer
        cache = DynamicCache(config=model.config)
    except (ImportError, TypeError, ValueError, AttributeError):
        return None
    layers = getattr(cache, "layers", None)
    if not isinstance(layers, list) or not layers:
        return None

    class PreallocatedLayer(DynamicLayer):
        def lazy_initialization(self, key_states, value_states):
            self.dtype, self.device, self.is_initialized = key_states.dtype, key_states.device, True
            self.buffers = [t.new_empty(*t.shape[:-2], capacity, t.shape[-1]) for t in (key_states, value_states)]
            self.keys, self.values = (b[..., :0, :] for b in self.buffers)

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            start = self.keys.shape[-2]
            end = start + key_states.shape[-2]
            if end > capacity:
                raise ValueError(f"the preallocated KV cache holds {capacity} positions; {end} were asked for")
            for buffer, new in zip(self.buffers, (key_states, value_states)):
                buffer[..., start:end, :] = new
            self.keys, self.values = (b[..., :end, :] for b in self.buffers)
            return self.keys, self.values

    cache.layers = [PreallocatedLayer() if type(layer) is DynamicLayer else layer for layer in layers]
    return cache


def _first_param(model):
    param = next(model.parameters(), None)
    if param is None:
        raise ValueError("the model has no parameters; self-calibration needs a causal language model")
    return param


@torch.inference_mode()
def generate_calibration(
    model,
    tokenizer=None,
    nsamples: int = 128,
    seqlen: int = 2048,
    *,
    seed: int = 0,
    temperature: float = DEFAULT_TEMPERATURE,
    top_p: float = DEFAULT_TOP_P,
    batch_size: int = DEFAULT_BATCH_SIZE,
    prefix: Optional[Union[str, Sequence[int], torch.Tensor]] = None,
    on_eos: str = "continue",
    sample_len: Optional[int] = None,
    device: Optional[Union[str, torch.device]] = None,
    progress: bool = True,
):
    """Sample ``nsamples`` sequences of exactly ``seqlen`` tokens from ``model``.

    ``sample_len`` (a divisor of ``seqlen``): each row is the concatenation of
    ``seqlen // sample_len`` independent samples of that length, each starting with the prefix, as
    packed pre-training documents are. Short samples drift less into repetition than one long one.
    Default: ``DEFAULT_SAMPLE_LEN`` where it divides ``seqlen``, else one sample per row.

    Returns ``(tokens, info)``: ``tokens`` is a CPU LongTensor ``[nsamples, seqlen]`` (prefix
    included) in the same form as dataset calibration; ``info`` records how it was made and the
    generation time in seconds. Sampling runs batched with the KV cache, in the model's own
    dtype, on ``device`` (default: where the model is; a model elsewhere is moved there for the
    generation and moved back afterwards). ``tokenizer`` may be None when the model config has a
    ``bos_token_id`` and ``prefix`` is not text. A progress bar counts generated tokens.
    """
    from tqdm.auto import tqdm

    check_generation_args(nsamples, seqlen, seed, temperature, top_p, batch_size, on_eos, sample_len)
    if sample_len is None:
        sample_len = DEFAULT_SAMPLE_LEN if seqlen % DEFAULT_SAMPLE_LEN == 0 else seqlen
    if sample_len != seqlen:
        pieces = seqlen // sample_len
        tokens, info = generate_calibration(model, tokenizer, nsamples * pieces, sample_len, seed=seed,
                                            temperature=temperature, top_p=top_p, batch_size=batch_size,
                                            prefix=prefix, on_eos=on_eos, device=device, progress=progress)
        info = dict(info, nsamples=nsamples, seqlen=seqlen, sample_len=sample_len, samples=nsamples * pieces)
        return tokens.reshape(nsamples, seqlen), info
    prefix_ids = resolve_prefix(model, tokenizer, prefix)
    if len(prefix_ids) >= seqlen:
        raise ValueError(f"seqlen={seqlen} leaves no room to generate after the {len(prefix_ids)}"
                         "-token prefix; seqlen must be larger than the prefix")
    eos_ids = _as_id_list(_config_value(model, "eos_token_id"))
    if not eos_ids and tokenizer is not None:
        eos_ids = _as_id_list(getattr(tokenizer, "eos_token_id", None))
    if on_eos == "suppress" and not eos_ids:
        raise ValueError("on_eos='suppress' needs an EOS token id, but neither the model config nor "
                         "the tokenizer defines one")

    param = _first_param(model)
    home, dtype = param.device, param.dtype
    run_device = torch.device(device) if device is not None else home
    was_training = model.training
    model.eval()
    if run_device != home:
        model.to(run_device)

    uniforms = sampling_uniforms(seed, nsamples, seqlen)
    tokens = torch.empty(nsamples, seqlen, dtype=torch.long)
    tokens[:, : len(prefix_ids)] = torch.tensor(prefix_ids, dtype=torch.long)
    start_pos = len(prefix_ids)
    bar = tqdm(total=nsamples * (seqlen - start_pos), unit="tok", desc="self-calibration",
               disable=not progress)
    t0 = time.perf_counter()
    try:
        for first in range(0, nsamples, batch_size):
            rows = slice(first, min(first + batch_size, nsamples))
            batch = tokens[rows].to(run_device, copy=True)
            step_input = batch[:, :start_pos]
            cache = preallocated_cache(model, seqlen)
            for pos in range(start_pos, seqlen):
                out = model(input_ids=step_input, past_key_values=cache, use_cache=True)
                cache = out.past_key_values
                logits = out.logits[:, -1, :].float()
                if on_eos == "suppress":
                    logits[:, eos_ids] = float("-inf")
                nxt = sample_next_token(logits, uniforms[rows, pos], temperature, top_p)
                batch[:, pos] = nxt
                step_input = nxt.unsqueeze(-1)
                bar.update(nxt.shape[0])
            tokens[rows] = batch.cpu()
            del cache, out
        if run_device.type == "cuda":
            torch.cuda.synchronize(run_device)
    finally:
        bar.close()
        if run_device != home:
            model.to(home)
        model.train(was_training)
    seconds = time.perf_counter() - t0

    generated = tokens[:, start_pos:]
    eos_sampled = int(torch.isin(generated, torch.tensor(eos_ids, dtype=torch.long)).sum()) \
        if eos_ids else 0
    info = {
        "source": "self",
        "model": getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__,
        "nsamples": nsamples,
        "seqlen": seqlen,
        "sample_len": seqlen,
        "samples": nsamples,
        "seed": seed,
        "temperature": float(temperature),
        "top_p": float(top_p),
        "batch_size": batch_size,
        "prefix_ids": prefix_ids,
        "on_eos": on_eos,
        "eos_token_ids": eos_ids,
        "eos_sampled": eos_sampled,
        "device": str(run_device),
        "dtype": str(dtype).replace("torch.", ""),
        "seconds": seconds,
        "tokens_per_second": generated.numel() / seconds if seconds > 0 else float("inf"),
    }
    return tokens, info
