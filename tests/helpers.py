"""Shared test utilities: tiny random models of every supported family, correlated inputs, and
a solver that dies mid-run (for the resume tests)."""
import contextlib

import torch


def correlated_inputs(n: int, d: int, seed: int = 0, rank: int = None) -> torch.Tensor:
    """``[n, d]`` activations with a non-trivial covariance (a few strong directions + noise)."""
    g = torch.Generator().manual_seed(seed)
    rank = rank or max(2, d // 4)
    basis = torch.randn(rank, d, generator=g)
    scales = torch.logspace(0, -1.5, rank).reshape(-1, 1)
    x = torch.randn(n, rank, generator=g) @ (basis * scales)
    x += 0.05 * torch.randn(n, d, generator=g)
    x[:, : d // 8] *= 4.0  # a few outlier features, as in real LLM activations
    return x


def tiny_model(family: str, seed: int = 0):
    """A 2-layer random model of ``family`` with hidden size 64, vocab 128, in eval mode."""
    import transformers as tf

    torch.manual_seed(seed)
    if family == "llama":  # grouped-query attention: 4 heads, 2 KV heads
        cfg = tf.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
        model = tf.LlamaForCausalLM(cfg)
    elif family == "opt":
        cfg = tf.OPTConfig(vocab_size=128, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                           word_embed_proj_dim=64, max_position_embeddings=128)
        model = tf.OPTForCausalLM(cfg)
    elif family == "gpt_neox":
        cfg = tf.GPTNeoXConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, max_position_embeddings=128)
        model = tf.GPTNeoXForCausalLM(cfg)
    elif family == "bloom":
        cfg = tf.BloomConfig(vocab_size=128, hidden_size=64, n_layer=2, n_head=4)
        model = tf.BloomForCausalLM(cfg)
    elif family == "gpt2":
        cfg = tf.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                            bos_token_id=0, eos_token_id=0)
        model = tf.GPT2LMHeadModel(cfg)
    else:
        raise ValueError(family)
    model.eval()
    model.config.use_cache = False
    return model


FAMILIES = ("llama", "opt", "gpt_neox", "bloom", "gpt2")


class Killed(Exception):
    """What :func:`sparsegpt_killed_after` raises: a run killed part-way."""


@contextlib.contextmanager
def sparsegpt_killed_after(calls: int):
    """Within the block, the registered ``sparsegpt`` solver works for ``calls`` calls and then
    raises :class:`Killed`; the real solver is restored on exit."""
    from pyprune.solvers import SOLVERS

    original, done = SOLVERS["sparsegpt"], [0]

    def dying(W, stats, pattern, **kw):
        done[0] += 1
        if done[0] > calls:
            raise Killed
        return original(W, stats, pattern, **kw)

    SOLVERS["sparsegpt"] = dying
    try:
        yield
    finally:
        SOLVERS["sparsegpt"] = original
