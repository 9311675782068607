"""Drop-in packed Linear modules and the model-level swap (CPU reference path, and the Triton path
under TRITON_INTERPRET=1)."""
import pytest
import torch
import torch.nn as nn
from transformers import LlamaConfig, LlamaForCausalLM

from pyprune.compress import compress
from pyprune.formats import PatternError, rtn_codes
from pyprune.formats.quant_state import QuantState
from pyprune.nn import CompressedLinear, Int4Linear, Sparse24Int4Linear, Sparse24Linear
from pyprune.ops import int4_grid


def prune_2of4(w):
    n, k = w.shape
    g = w.reshape(n, k // 4, 4)
    return g.scatter(2, g.abs().argsort(-1)[..., :2], 0.0).reshape(n, k)


def rel(a, b):
    return float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm())


def linear_with(weight, bias=True):
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias)
    with torch.no_grad():
        lin.weight.copy_(weight)
    return lin


def test_sparse24_linear_matches_dense():
    lin = linear_with(prune_2of4(torch.randn(40, 128)).half().float())  # fp16-exact values
    mod = Sparse24Linear.from_linear(lin)
    x = torch.randn(3, 5, 128)
    assert rel(mod(x), lin(x)) < 1e-6
    assert torch.equal(mod.dense_weight(), lin.weight)


def test_int4_linear_rtn_and_exact_codes():
    w = torch.randn(48, 128)
    lin = linear_with(w)
    rtn = Int4Linear.from_linear(lin, groupsize=64)
    codes, scales = rtn_codes(w, 64)
    assert torch.equal(rtn.dense_weight(), int4_grid.dequantize_groups(codes, scales, 64))
    # Codes from a quantizer (here with -8 codes RTN never emits) are taken exactly.
    codes[::3, ::5] = -8
    dense = int4_grid.dequantize_groups(codes, scales, 64)
    qlin = linear_with(dense)
    state = QuantState(qweight=codes, scales=scales, pruned=torch.zeros_like(codes, dtype=torch.bool), groupsize=64)
    mod = Int4Linear.from_linear(qlin, quant_state=state)
    assert torch.equal(mod.packed().unpack()[0], codes)
    x = torch.randn(4, 128)
    assert rel(mod(x), qlin(x)) < 1e-6
    # The same weight given as scales only: its codes are recovered from the grid.
    assert torch.equal(Int4Linear.from_linear(qlin, groupsize=64, scales=scales).qweight, mod.qweight)


def test_int4_linear_refuses_codes_of_another_layer():
    w = torch.randn(16, 64)
    codes, scales = rtn_codes(w, 32)
    other = linear_with(torch.randn(16, 64))
    with pytest.raises(PatternError, match="do not reproduce the layer's weight"):
        Int4Linear.from_linear(other, codes=codes, scales=scales, groupsize=32)


def test_sparse24_int4_linear_and_refusal():
    w = prune_2of4(torch.randn(40, 128))
    mod = Sparse24Int4Linear.from_linear(linear_with(w), groupsize=32)
    codes, scales = rtn_codes(w, 32)
    assert torch.equal(mod.dense_weight(), int4_grid.dequantize_groups(codes, scales, 32))
    dense = torch.randn(40, 128)
    with pytest.raises(PatternError, match="not 2:4 sparse: row 0"):
        Sparse24Int4Linear.from_linear(linear_with(dense))
    with pytest.raises(TypeError, match="expects an nn.Linear"):
        Sparse24Linear.from_linear(nn.Conv1d(4, 4, 1))


def test_repr_states_compression():
    w = prune_2of4(torch.randn(64, 256))
    assert "9.000 bits/weight, 1.78x smaller than fp16" in repr(Sparse24Linear.from_linear(linear_with(w)))
    assert "int4 g128, 4.125 bits/weight, 3.88x smaller" in repr(Int4Linear.from_linear(linear_with(w)))
    assert "2:4-int4 g128, 3.125 bits/weight, 5.12x smaller" in repr(Sparse24Int4Linear.from_linear(linear_with(w)))


@pytest.mark.parametrize("cls,kwargs", [(Sparse24Linear, {}), (Int4Linear, {"groupsize": 128}),
                                        (Sparse24Int4Linear, {"groupsize": 64})])
def test_kernel_path_matches_reference(cls, kwargs):
    lin = linear_with(prune_2of4(torch.randn(40, 256)).half().float())
    mod = cls.from_linear(lin, **kwargs)
    for m, dtype in ((1, torch.float16), (20, torch.bfloat16)):
        x = torch.randn(m, 256).to(dtype)
        assert rel(mod.kernel_forward(x), mod.reference_forward(x)) < 1e-3


def tiny_llama(layers=2, dtype=torch.float32):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).to(dtype).eval()


def prepare(model, fmt, groupsize=32):
    """Prune (2:4 formats) and quantize (INT4 formats) the Linears in place, as the pipeline
    would; returns the quant state of the INT4 formats."""
    states = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and ".layers." in name:
            w = mod.weight.data.float()
            if fmt != "int4":
                w = prune_2of4(w)
            if fmt == "2:4":
                mod.weight.data.copy_(w.half().float())  # fp16 values, as the format stores them
                continue
            codes, scales = rtn_codes(w, groupsize)
            states[name] = QuantState(codes, scales, codes == 0, groupsize)
            mod.weight.data.copy_(int4_grid.dequantize_groups(codes, scales, groupsize))
    return states


@pytest.mark.parametrize("fmt", ["2:4", "int4", "2:4-int4"])
def test_model_swap_keeps_logits(fmt):
    model = tiny_llama()
    states = prepare(model, fmt)
    ids = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        before = model(ids).logits
    report = compress(model, fmt, groupsize=32, quant_state=states or None)
    assert report.totals()["compressed"] == 14 and not report.skipped
    assert all(isinstance(m, CompressedLinear) for n, m in model.named_modules() if n.endswith("_proj"))
    assert isinstance(model.lm_head, nn.Linear)  # lm_head and embeddings stay dense
    with torch.no_grad():
        after = model(ids).logits
    assert rel(after, before) < 1e-3


def test_compress_skips_and_reports_misfits():
    model = tiny_llama()
    prepare(model, "2:4")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight.normal_()  # dense again: cannot be 2:4
    report = compress(model, "2:4")
    assert [m.name for m in report.skipped] == ["model.layers.1.mlp.up_proj"]
    assert "not 2:4 sparse" in report.skipped[0].reason
    assert isinstance(model.model.layers[1].mlp.up_proj, nn.Linear)
    assert "skipped model.layers.1.mlp.up_proj" in str(report)
    with pytest.raises(ValueError, match="cannot compress model.layers.0.self_attn.q_proj to 2:4"):
        compress(tiny_llama(), "2:4", strict=True)


def test_compress_rejects_bad_format_and_unknown_state():
    with pytest.raises(ValueError, match="unknown compressed format 'int8'"):
        compress(tiny_llama(1), "int8")
    with pytest.raises(ValueError, match="not Linears of the decoder layers"):
        compress(tiny_llama(1), "int4", groupsize=32, quant_state={"lm_head": None})


def test_whole_model_on_the_triton_path(monkeypatch):
    """Every packed Linear runs its Triton kernel (interpreter) inside the HF model."""
    model = tiny_llama(layers=1, dtype=torch.float16)
    states = prepare(model, "2:4-int4")
    compress(model, "2:4-int4", quant_state=states)
    ids = torch.randint(0, 96, (1, 6))
    with torch.no_grad():
        ref = model(ids).logits
        monkeypatch.setattr(CompressedLinear, "_use_kernel", lambda self, x: True)
        out = model(ids).logits
    assert rel(out, ref) < 1e-3


def test_reference_weight_cache():
    from pyprune.nn import cache_reference_weights

    model = tiny_llama(layers=1)
    compress(model, "int4", groupsize=32)
    ids = torch.randint(0, 96, (1, 8))
    with torch.no_grad():
        plain = model(ids).logits
        assert cache_reference_weights(model) == 7
        cached, again = model(ids).logits, model(ids).logits
    assert torch.equal(plain, cached) and torch.equal(cached, again)
    # New packed tensors (e.g. a reload) invalidate the cached weight.
    proj = model.model.layers[0].mlp.down_proj
    fresh = Int4Linear.from_linear(linear_with(torch.randn(64, 128), bias=False), groupsize=32)
    proj.load_state_dict(fresh.state_dict())
    x = torch.randn(2, 128)
    assert torch.equal(proj(x), fresh(x))
