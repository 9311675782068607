"""Compressed checkpoints: save -> load gives identical outputs, sizes are what the formats
promise, and truncated or tampered files raise instead of loading garbage."""
import json
import os

import pytest
import torch
import torch.nn as nn
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from pyprune.checkpoint import (
    MANIFEST, WEIGHTS, CheckpointError, is_compressed_checkpoint, load, load_tokenizer, read_manifest,
    save_compressed,
)
from pyprune.compress import compress
from pyprune.nn import CompressedLinear, Int4Linear, Sparse24Int4Linear, Sparse24Linear


def prune_2of4(w):
    n, k = w.shape
    g = w.reshape(n, k // 4, 4)
    return g.scatter(2, g.abs().argsort(-1)[..., :2], 0.0).reshape(n, k)


def tiny_model(hidden=64, inter=128, layers=2, tie=True, dtype=torch.float32):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tie)
    model = LlamaForCausalLM(cfg).to(dtype).eval()
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, nn.Linear) and ".layers." in name:
                mod.weight.copy_(prune_2of4(mod.weight.float()).half())
    return model


def compressed(fmt, groupsize=32, **kw):
    model = tiny_model(**kw)
    compress(model, fmt, groupsize=groupsize, strict=True)
    return model


@pytest.fixture(scope="module")
def saved_int4(tmp_path_factory):
    model = compressed("int4")
    out = tmp_path_factory.mktemp("ckpt")
    save_compressed(model, out)
    return model, out


@pytest.mark.parametrize("fmt,cls", [("2:4", Sparse24Linear), ("int4", Int4Linear), ("2:4-int4", Sparse24Int4Linear)])
def test_save_load_identical_outputs(tmp_path, fmt, cls):
    model = compressed(fmt)
    ids = torch.randint(0, 64, (2, 9))
    save_compressed(model, tmp_path)
    assert is_compressed_checkpoint(tmp_path)
    loaded = load(tmp_path)
    assert isinstance(loaded.model.layers[1].mlp.down_proj, cls)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    # Tied embeddings are stored once and stay shared.
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert not any(t.is_meta for t in list(loaded.parameters()) + list(loaded.buffers()))


def test_generate_after_load(saved_int4):
    model, path = saved_int4
    loaded = load(path)
    prompt = torch.randint(0, 64, (1, 5))
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        out = loaded.generate(prompt, **kw)
        assert out.shape == (1, 11)
        assert torch.equal(out, model.generate(prompt, **kw))


def test_manifest_and_sizes(tmp_path):
    # Width 256 allows group size 128; dense parts in fp16 as a served model would be.
    model = tiny_model(hidden=256, inter=512, layers=1, dtype=torch.float16)
    report = compress(model, "2:4-int4", groupsize=128, strict=True)
    size = save_compressed(model, tmp_path, report=report)
    m = read_manifest(tmp_path)
    assert m["format_version"] == 1 and m["model_config"]["hidden_size"] == 256
    assert m["modules"]["model.layers.0.mlp.down_proj"] == {
        "kind": "2:4-int4", "shape": [256, 512], "groupsize": 128, "bias_dtype": None}
    assert m["compression"]["totals"]["bits_per_weight"] == pytest.approx(3.125)
    tensor_bytes = sum(
        torch.Size(e["shape"]).numel() * getattr(torch, e["dtype"]).itemsize for e in m["tensors"].values()
    )
    on_disk = os.path.getsize(tmp_path / WEIGHTS)
    assert size["on_disk_bytes"] == on_disk and on_disk - tensor_bytes < 16384  # header only
    linear_fp16 = 2 * sum(256 * o for o in (256, 128, 128, 256, 512, 512)) + 2 * 512 * 256
    embed_fp16 = 2 * 64 * 256 + 2 * 2 * 256  # tied embedding + 2 norms
    assert size["fp16_bytes"] == linear_fp16 + embed_fp16 + 2 * 256  # + final norm
    assert size["ratio_vs_fp16"] < 0.3


def test_dtype_options(tmp_path):
    model = compressed("2:4-int4")
    save_compressed(model, tmp_path, dense_dtype=torch.float16)
    ids = torch.randint(0, 64, (1, 7))
    assert read_manifest(tmp_path)["tensors"]["model.embed_tokens.weight"]["dtype"] == "float16"
    loaded = load(tmp_path, dtype=torch.float32)
    assert loaded.model.embed_tokens.weight.dtype == torch.float32
    assert loaded.model.layers[0].self_attn.q_proj.scales.dtype == torch.float16  # packed: untouched
    with torch.no_grad():
        a, b = loaded(ids).logits, model(ids).logits
    assert float((a - b).norm() / b.norm()) < 1e-2  # dense parts rounded to fp16 only


def test_tokenizer_is_saved_and_reloaded(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["[UNK]", "the", "cat", "sat", "on", "mat"])}
    raw = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]")
    save_compressed(compressed("int4"), tmp_path, tokenizer=tok)
    assert "tokenizer.json" in read_manifest(tmp_path)["tokenizer_files"]
    assert load_tokenizer(tmp_path)("the cat sat").input_ids == [1, 2, 3]


def _copy(src, dst):
    dst.mkdir()
    for name in os.listdir(src):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def test_truncated_file_is_refused(saved_int4, tmp_path):
    path = _copy(saved_int4[1], tmp_path / "t")
    data = (path / WEIGHTS).read_bytes()
    (path / WEIGHTS).write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="truncated or replaced"):
        load(path)
    with pytest.raises(CheckpointError, match="truncated or replaced"):
        load(path, verify=False)


def test_tampered_tensor_is_refused(saved_int4, tmp_path):
    path = _copy(saved_int4[1], tmp_path / "t")
    data = bytearray((path / WEIGHTS).read_bytes())
    data[-5] ^= 0x40  # flip one bit in the last tensor's bytes: still a valid file
    (path / WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum mismatch for tensor"):
        load(path)


@pytest.mark.parametrize("fmt", ["2:4", "2:4-int4"])
def test_metadata_breaking_the_position_order_is_refused(tmp_path, fmt):
    # A file written with consistent checksums but a group storing positions (1, 1): the kernels
    # assume i0 < i1, so loading must refuse it rather than compute garbage.
    model = compressed(fmt)
    module = model.model.layers[1].mlp.up_proj
    module.meta[0, 3] = (module.meta[0, 3] & ~0xF0) | (0x5 << 4)  # row 3, group 1: i0 = i1 = 1
    save_compressed(model, tmp_path)
    with pytest.raises(CheckpointError, match=r"'model.layers.1.mlp.up_proj'.*group 1 of row 3 stores "
                                              r"positions \(1, 1\); each group needs i0 < i1"):
        load(tmp_path)


def test_bad_manifests_are_refused(saved_int4, tmp_path):
    src = saved_int4[1]
    with pytest.raises(CheckpointError, match="no pyprune_manifest.json"):
        load(tmp_path)
    for i, (edit, message) in enumerate([
        (lambda m: m.update(format_version=99), "format_version 99 is not supported"),
        (lambda m: m.update(format="other"), "expected 'pyprune-compressed'"),
        (lambda m: m["tensors"]["model.norm.weight"].update(shape=[3]), "the manifest says float32 \\[3\\]"),
        (lambda m: m["modules"]["model.layers.0.mlp.up_proj"].update(kind="int3"), "unknown packed format 'int3'"),
        (lambda m: m["modules"].pop("model.layers.0.mlp.up_proj"), "checkpoint does not fit the model"),
    ]):
        path = _copy(src, tmp_path / f"m{i}")
        manifest = json.loads((path / MANIFEST).read_text())
        edit(manifest)
        (path / MANIFEST).write_text(json.dumps(manifest))
        with pytest.raises(CheckpointError, match=message):
            load(path)
    path = _copy(src, tmp_path / "nojson")
    (path / MANIFEST).write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load(path)
    path = _copy(src, tmp_path / "noweights")
    os.remove(path / WEIGHTS)
    with pytest.raises(CheckpointError, match="is missing"):
        load(path)


def test_saving_needs_packed_modules(tmp_path):
    with pytest.raises(CheckpointError, match="run pyprune.compress"):
        save_compressed(tiny_model(layers=1), tmp_path)
    assert isinstance(compressed("2:4").model.layers[0].self_attn.o_proj, CompressedLinear)
