"""Self-generated calibration (pyprune.data.self_calibration) and calibration files."""
import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pyprune.data.calibration_file import (CalibrationFileError, load_calibration,
                                           save_calibration)
from pyprune.data import self_calibration
from pyprune.data.self_calibration import (generate_calibration, preallocated_cache, resolve_prefix,
                                           sample_next_token, sampling_uniforms)

BOS, EOS, VOCAB = 1, 2, 96


def tiny_llama(bos=BOS, eos=EOS, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=bos, eos_token_id=eos, pad_token_id=None,
                      tie_word_embeddings=False)
    cfg.use_cache = False  # as the pruning pipeline loads models: generation must turn it on itself
    model = LlamaForCausalLM(cfg).eval()
    # Random init gives nearly uniform logits; sharpen them so the sampler's choices matter.
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model


class EncodeOnlyTokenizer:
    """A tokenizer without BOS: maps each character to (code point % VOCAB)."""
    bos_token_id = None
    eos_token_id = EOS

    def encode(self, text, add_special_tokens=True):
        return [ord(c) % VOCAB for c in text]


def gen(model, n=5, L=12, **kw):
    kw.setdefault("batch_size", 2)
    kw.setdefault("progress", False)
    return generate_calibration(model, None, n, L, **kw)


def test_preallocated_cache_gives_the_tokens_of_the_library_cache(monkeypatch):
    model = tiny_llama()
    cache = preallocated_cache(model, 40)
    assert cache is not None, "this transformers version should take the preallocated layers"
    fast, _ = gen(model, n=3, L=40, seed=5, batch_size=3)
    monkeypatch.setattr(self_calibration, "preallocated_cache", lambda model, capacity: None)
    plain, _ = gen(model, n=3, L=40, seed=5, batch_size=3)
    assert torch.equal(fast, plain)
    # Asking for more positions than preallocated is an error, not a silent overwrite.
    layer = cache.layers[0]
    with pytest.raises(ValueError, match="holds 40 positions"):
        layer.update(torch.zeros(1, 2, 41, 8), torch.zeros(1, 2, 41, 8))


def test_exact_shape_prefix_and_determinism():
    model = tiny_llama()
    a, info = gen(model, n=5, L=12, seed=3, batch_size=2)
    b, _ = gen(model, n=5, L=12, seed=3, batch_size=2)
    c, _ = gen(model, n=5, L=12, seed=4, batch_size=2)
    assert a.shape == (5, 12) and a.dtype == torch.long and a.device.type == "cpu"
    assert torch.equal(a, b), "same seed must give the same tokens"
    assert not torch.equal(a, c), "another seed must give other tokens"
    assert torch.all(a[:, 0] == BOS) and int(a.min()) >= 0 and int(a.max()) < VOCAB
    # Rows are different texts, not one sample repeated.
    assert len({tuple(r.tolist()) for r in a}) == 5
    assert info["seed"] == 3 and info["nsamples"] == 5 and info["seqlen"] == 12
    assert info["prefix_ids"] == [BOS] and info["seconds"] > 0
    assert not model.training


@pytest.mark.parametrize("batch_size", [1, 3, 7])
def test_batch_size_does_not_change_tokens(batch_size):
    # 7 does not divide 5 rows, 3 leaves a short last batch; all must give the same rows.
    model = tiny_llama()
    ref, _ = gen(model, n=5, L=10, seed=1, batch_size=5)
    got, info = gen(model, n=5, L=10, seed=1, batch_size=batch_size)
    assert got.shape == (5, 10)
    assert torch.equal(got, ref)
    assert info["batch_size"] == batch_size


def test_kv_cache_matches_full_recompute():
    # The cached sampling loop must pick exactly the tokens a cache-free loop picks.
    model = tiny_llama(seed=5)
    n, L, temperature, top_p = 3, 14, 0.8, 0.9
    got, _ = gen(model, n=n, L=L, seed=7, temperature=temperature, top_p=top_p, batch_size=3)
    u = sampling_uniforms(7, n, L)
    ref = torch.full((n, 1), BOS, dtype=torch.long)
    with torch.no_grad():
        for pos in range(1, L):
            logits = model(input_ids=ref, use_cache=False).logits[:, -1, :]
            nxt = sample_next_token(logits, u[:, pos], temperature, top_p)
            ref = torch.cat([ref, nxt[:, None]], dim=1)
    assert torch.equal(got, ref)


def test_sampler_follows_temperature_and_top_p():
    logits = torch.randn(1, 6) * 2
    grid = (torch.arange(20000, dtype=torch.float64) + 0.5) / 20000
    for temperature, top_p in [(1.0, 1.0), (2.0, 1.0), (0.7, 0.6)]:
        probs = torch.softmax(logits[0] / temperature, dim=-1)
        sp, order = probs.sort(descending=True)
        keep = (sp.cumsum(0) - sp) < top_p
        want = torch.zeros(6)
        want[order[keep]] = sp[keep] / sp[keep].sum()
        toks = sample_next_token(logits.expand(len(grid), -1), grid, temperature, top_p)
        freq = torch.bincount(toks, minlength=6).float() / len(grid)
        assert torch.allclose(freq, want, atol=2e-4), (temperature, top_p, freq, want)
    # A tiny nucleus degenerates to the most likely token, whatever the uniform.
    toks = sample_next_token(logits.expand(5, -1), torch.rand(5, dtype=torch.float64), 1.0, 1e-6)
    assert torch.all(toks == logits.argmax())


def _favour_eos(model, boost=6.0):
    def hook(module, args, out):
        out = out.clone()
        out[..., EOS] += boost
        return out
    return model.lm_head.register_forward_hook(hook)


def test_eos_continue_keeps_sampling_after_eos():
    model = tiny_llama()
    handle = _favour_eos(model)
    tokens, info = gen(model, n=4, L=24, seed=0)
    handle.remove()
    assert tokens.shape == (4, 24)
    gen_part = tokens[:, 1:]
    assert info["on_eos"] == "continue" and info["eos_token_ids"] == [EOS]
    assert info["eos_sampled"] == int((gen_part == EOS).sum()) > 0
    # Text goes on after an EOS: some row has a non-EOS token after its first EOS.
    after = [row[(row == EOS).nonzero()[0, 0] + 1:] for row in gen_part if (row == EOS).any()]
    assert any(bool((rest != EOS).any()) for rest in after)


def test_eos_suppress_never_emits_eos():
    model = tiny_llama()
    handle = _favour_eos(model)
    tokens, info = gen(model, n=4, L=24, seed=0, on_eos="suppress")
    handle.remove()
    assert tokens.shape == (4, 24) and info["eos_sampled"] == 0
    assert not bool((tokens[:, 1:] == EOS).any())


def test_prefix_resolution():
    model = tiny_llama()
    assert resolve_prefix(model, None, None) == [BOS]
    assert resolve_prefix(model, None, [5, 6]) == [5, 6]
    no_bos = tiny_llama(bos=None)
    # No BOS anywhere: a short neutral text prefix from the tokenizer.
    assert resolve_prefix(no_bos, EncodeOnlyTokenizer(), None) == [ord("\n") % VOCAB]
    tokens, info = generate_calibration(no_bos, EncodeOnlyTokenizer(), 2, 8, progress=False)
    assert tokens.shape == (2, 8) and info["prefix_ids"] == [ord("\n") % VOCAB]
    with pytest.raises(ValueError, match="bos_token_id"):
        resolve_prefix(no_bos, None, None)
    with pytest.raises(ValueError, match="tokenizer"):
        resolve_prefix(model, None, "Once upon")
    with pytest.raises(ValueError, match=r"outside the vocabulary"):
        resolve_prefix(model, None, [VOCAB + 3])
    # A longer prefix is kept at the start of every row, and the row length stays exact.
    tokens, _ = gen(model, n=3, L=9, prefix=[BOS, 7, 8])
    assert tokens.shape == (3, 9) and torch.all(tokens[:, :3] == torch.tensor([BOS, 7, 8]))


def test_short_samples_packed_into_windows():
    """sample_len: each window holds seqlen // sample_len independent samples, each from the prefix,
    and is the same text as generating those samples directly."""
    model = tiny_llama()
    packed, info = gen(model, n=3, L=12, seed=5, sample_len=4)
    pieces, _ = gen(model, n=9, L=4, seed=5)
    assert packed.shape == (3, 12) and torch.equal(packed, pieces.reshape(3, 12))
    assert torch.all(packed[:, ::4] == BOS)
    assert info["nsamples"] == 3 and info["seqlen"] == 12 and info["sample_len"] == 4 and info["samples"] == 9


def test_default_sample_len_applies_where_it_divides_the_window(monkeypatch):
    from pyprune.data import self_calibration

    monkeypatch.setattr(self_calibration, "DEFAULT_SAMPLE_LEN", 4)
    model = tiny_llama()
    packed, info = gen(model, n=2, L=12, seed=2)
    assert info["sample_len"] == 4 and torch.equal(packed, gen(model, n=6, L=4, seed=2)[0].reshape(2, 12))
    whole, info = gen(model, n=2, L=10, seed=2)  # 4 does not divide 10: one sample per row
    assert info["sample_len"] == 10 and info["samples"] == 2 and (whole[:, 4] != BOS).any()


@pytest.mark.parametrize("kw, match", [
    (dict(n=0), "nsamples=0"),
    (dict(L=1), "seqlen=1 leaves no room"),
    (dict(temperature=0.0), "temperature=0.0"),
    (dict(top_p=1.5), "top_p=1.5"),
    (dict(top_p=0.0), "top_p=0.0"),
    (dict(batch_size=0), "batch_size=0"),
    (dict(on_eos="stop"), "on_eos='stop'"),
    (dict(seed=1.5), "seed=1.5"),
    (dict(L=12, sample_len=5), "sample_len=5"),
    (dict(sample_len=1), "sample_len=1"),
])
def test_bad_arguments_are_named(kw, match):
    with pytest.raises(ValueError, match=match):
        gen(tiny_llama(), **kw)


def test_saved_calibration_reloads_identically(tmp_path):
    model = tiny_llama()
    tokens, info = gen(model, n=3, L=16, seed=2)
    path = save_calibration(tmp_path / "sub" / "calib.safetensors", tokens, info)
    loaded, meta = load_calibration(path, nsamples=3, seqlen=16, vocab_size=VOCAB)
    assert loaded.dtype == torch.long and torch.equal(loaded, tokens)
    assert {k: meta[k] for k in info} == json.loads(json.dumps(info))
    assert meta["format_version"] == 1
    assert not list(tmp_path.glob("sub/*.tmp"))


def test_calibration_file_errors_name_the_path(tmp_path):
    tokens = torch.randint(0, VOCAB, (2, 8))
    good = save_calibration(tmp_path / "good.safetensors", tokens, {"source": "self"})
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_calibration(missing)

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(torch.randint(0, 256, (300,), dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(CalibrationFileError, match="garbage.safetensors"):
        load_calibration(garbage)

    raw = good.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(raw[:-20])
    with pytest.raises(CalibrationFileError, match="truncated.safetensors"):
        load_calibration(truncated)

    flipped = tmp_path / "flipped.safetensors"
    data = bytearray(raw)
    data[-3] ^= 0x40  # inside the token data: only the checksum can notice
    flipped.write_bytes(bytes(data))
    with pytest.raises(CalibrationFileError, match="flipped.safetensors.*corrupt"):
        load_calibration(flipped)

    with pytest.raises(CalibrationFileError, match="holds 2 samples, but nsamples=4"):
        load_calibration(good, nsamples=4)
    with pytest.raises(CalibrationFileError, match="seqlen=16"):
        load_calibration(good, seqlen=16)
    with pytest.raises(CalibrationFileError, match="another tokenizer"):
        load_calibration(good, vocab_size=int(tokens.max()))
    with pytest.raises(ValueError, match="shape"):
        save_calibration(tmp_path / "bad.safetensors", tokens[0], {})
    with pytest.raises(ValueError, match="JSON"):
        save_calibration(tmp_path / "bad.safetensors", tokens, {"model": object()})


def test_foreign_safetensors_file_loads(tmp_path):
    from safetensors.torch import save_file
    tokens = torch.randint(0, VOCAB, (3, 5))
    save_file({"input_ids": tokens}, str(tmp_path / "other.safetensors"))
    loaded, meta = load_calibration(tmp_path / "other.safetensors")
    assert torch.equal(loaded, tokens) and meta == {"source": "file"}
