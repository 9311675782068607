"""The INT4 format, RTN, storage accounting and the INT4 sidecar."""
import os

import pytest
import torch
from safetensors.torch import save_file

from pyprune.formats.quant_state import (
    QuantStateError, apply_quant_state, load_quant_state, read_user_metadata, save_quant_state,
    sidecar_path,
)
from pyprune.ops import int4_grid
from pyprune.solvers.compressed_size import layer_storage, model_size_bytes, total_storage
from pyprune.solvers.quantize import quantize_layer
from pyprune.solvers.pattern import SparsityPattern, select_pruned


def random_weight(rows=48, cols=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Heavy-ish tails and per-row scale differences, like real layers.
    return torch.randn(rows, cols, generator=g) * torch.rand(rows, 1, generator=g).add(0.1)


def assert_on_grid(result):
    codes, scales, g = result.qweight, result.scales, result.groupsize
    assert codes.dtype == torch.int8
    assert int(codes.min()) >= -8 and int(codes.max()) <= 7
    assert scales.dtype == torch.float32 and (scales != 0).all()  # signed fits give negative scales
    assert torch.equal(scales.to(torch.float16).float(), scales), "scales must be fp16-exact"
    assert scales.shape == (codes.shape[0], codes.shape[1] // g)
    expected = codes.float() * scales.repeat_interleave(g, dim=1)
    assert torch.equal(result.weight, expected), "dequantized weight must equal scale * code exactly"


@pytest.mark.parametrize("groupsize", [32, 64, 128, -1])
def test_rtn_is_on_grid_and_nearest(groupsize):
    W = random_weight()
    r = quantize_layer(W, None, method="rtn", groupsize=groupsize)
    assert_on_grid(r)
    assert r.groupsize == (W.shape[1] if groupsize == -1 else groupsize)
    # Min-max scale: the largest magnitude of every group maps to +-7.
    g = r.groupsize
    absmax = W.abs().reshape(W.shape[0], -1, g).amax(dim=2)
    assert torch.equal(r.qweight.abs().reshape(W.shape[0], -1, g).amax(dim=2), torch.full_like(absmax, 7, dtype=torch.int8))
    # Round to nearest: error at most half a step (plus fp16 rounding of the scale).
    step = r.scales.repeat_interleave(g, dim=1)
    assert ((W - r.weight).abs() <= 0.5 * step * 1.01 + 1e-7).all()
    assert r.info["method"] == "rtn"


def test_rtn_is_better_with_smaller_groups():
    W = random_weight(cols=512)
    errors = [float((quantize_layer(W, None, method="rtn", groupsize=g).weight - W).pow(2).sum()) for g in (32, 128, -1)]
    assert errors[0] < errors[1] < errors[2]


def test_rtn_mask_kept_and_scale_ignores_pruned():
    W = random_weight()
    pruned = select_pruned(W.abs(), SparsityPattern(0.5))
    W_big = W.clone()
    W_big[pruned] = 1000.0  # pruned entries must neither survive nor widen a scale
    r = quantize_layer(W_big, None, method="rtn", groupsize=64, pruned=pruned)
    assert torch.equal(r.pruned, pruned)
    assert (r.weight[pruned] == 0).all() and (r.qweight[pruned] == 0).all()
    ref = quantize_layer(W.masked_fill(pruned, 0.0), None, method="rtn", groupsize=64, pruned=pruned)
    assert torch.equal(r.scales, ref.scales)
    assert float(r.scales.max()) < 10.0


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_groupsize_must_divide_width(method):
    from pyprune.solvers.base import LayerStats
    W = random_weight(rows=8, cols=192)
    stats = LayerStats(torch.eye(192), 1)
    with pytest.raises(ValueError, match=r"groupsize=128 does not divide the layer width 192.*32, 64"):
        quantize_layer(W, stats, method=method, groupsize=128)
    with pytest.raises(ValueError, match=r"groupsize=48 is not supported"):
        quantize_layer(W, stats, method=method, groupsize=48)


def test_mse_scale_fit_never_rounds_worse_than_minmax():
    W = random_weight(rows=64, cols=128, seed=3)
    W[:, 5] *= 6.0  # an outlier column: shrinking the scale pays off on most groups
    for groupsize in (32, -1):
        minmax = quantize_layer(W, None, method="rtn", groupsize=groupsize)
        mse = quantize_layer(W, None, method="rtn", groupsize=groupsize, scale_fit="mse")
        assert_on_grid(mse)
        assert mse.info["scale_fit"] == "mse"
        err_minmax = (minmax.weight - W).pow(2).reshape(64, -1, minmax.groupsize).sum(-1)
        err_mse = (mse.weight - W).pow(2).reshape(64, -1, mse.groupsize).sum(-1)
        assert (err_mse <= err_minmax).all()  # r = 1 is a candidate, per group
        assert float(err_mse.sum()) < 0.9 * float(err_minmax.sum())
        assert (mse.scales <= minmax.scales).all() and (mse.scales < minmax.scales).any()


def test_mse_scale_fit_weighs_columns():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 32, generator=g)
    w[:, 0] = 20.0  # an outlier in every row
    unweighted = int4_grid.fit_scale(w, "mse")
    ignore_outlier = torch.ones(1, 32)
    ignore_outlier[0, 0] = 0.0
    weighted = int4_grid.fit_scale(w, "mse", ignore_outlier)
    only_outlier = torch.zeros(1, 32)
    only_outlier[0, 0] = 1.0
    exact_outlier = int4_grid.fit_scale(w, "mse", only_outlier)
    # Ignoring the outlier, a grid near the finest candidate (0.3 x min-max) fits the Gaussian
    # rest best; counting it, so fine a grid would clip it from 20 to about 6.
    minmax = int4_grid.fit_scale(w, "minmax")
    assert (weighted < 0.4 * minmax).all() and (unweighted > 0.9 * minmax).all()
    # Only the outlier counts: it must land exactly on the grid (20 = 7 * scale is min-max).
    assert torch.equal(exact_outlier, int4_grid.fit_scale(w, "minmax"))
    assert torch.equal(int4_grid.fit_scale(torch.zeros(3, 8), "mse"), torch.ones(3, 1))


def test_signed_scale_fit_uses_all_16_levels_without_clipping():
    W = random_weight(rows=64, cols=256, seed=5)
    g = 32
    minmax = quantize_layer(W, None, method="rtn", groupsize=g)
    signed = quantize_layer(W, None, method="rtn", groupsize=g, scale_fit="signed")
    assert_on_grid(signed)
    groups, codes = W.reshape(64, -1, g), signed.qweight.reshape(64, -1, g)
    # The side of zero holding the largest magnitude gets the 8th level: the scale's sign is
    # opposite to that weight's, so the weight's code is negative.
    extreme = groups.gather(2, groups.abs().argmax(dim=2, keepdim=True)).squeeze(2)
    assert torch.equal(torch.sign(signed.scales), -torch.sign(extreme))
    assert (codes.min(dim=2).values == -8).float().mean() > 0.5  # -8 is used, not only reachable
    # Never a coarser grid than min-max's, and nothing clipped: error at most half a step.
    assert (signed.scales.abs() <= minmax.scales).all() and (signed.scales.abs() < minmax.scales).float().mean() > 0.9
    step = signed.scales.abs().repeat_interleave(g, dim=1)
    assert ((W - signed.weight).abs() <= 0.5 * step * 1.01 + 1e-7).all()
    err = {fit: float((r.weight - W).pow(2).sum()) for fit, r in (("minmax", minmax), ("signed", signed))}
    assert err["signed"] < 0.9 * err["minmax"], err
    # Both signs are used, and a group whose largest magnitude is positive maps it to -8 exactly.
    w = torch.tensor([[0.0, 1.0, -0.5, 8.0]])
    assert float(int4_grid.fit_scale(w, "signed")) == -1.0
    assert torch.equal(int4_grid.fit_scale(-w, "signed"), torch.ones(1, 1))
    assert torch.equal(int4_grid.fit_scale(torch.zeros(3, 8), "signed"), torch.ones(3, 1))


def test_signed_mse_never_rounds_worse_than_signed():
    W = random_weight(rows=64, cols=128, seed=3)
    W[:, 5] *= 6.0
    signed = quantize_layer(W, None, method="rtn", groupsize=32, scale_fit="signed")
    mse = quantize_layer(W, None, method="rtn", groupsize=32, scale_fit="signed-mse")
    assert_on_grid(mse)
    err_signed = (signed.weight - W).pow(2).reshape(64, -1, 32).sum(-1)
    err_mse = (mse.weight - W).pow(2).reshape(64, -1, 32).sum(-1)
    assert (err_mse <= err_signed).all() and float(err_mse.sum()) < 0.95 * float(err_signed.sum())
    assert torch.equal(torch.sign(mse.scales), torch.sign(signed.scales))  # the search only shrinks


def test_bad_arguments_are_refused():
    W = random_weight(rows=8, cols=64)
    with pytest.raises(ValueError, match="unknown quantization method 'awq'"):
        quantize_layer(W, None, method="awq")
    with pytest.raises(ValueError, match="act_order is a GPTQ option"):
        quantize_layer(W, None, method="rtn", groupsize=32, act_order=True)
    with pytest.raises(ValueError, match="bool mask of shape"):
        quantize_layer(W, None, method="rtn", groupsize=32, pruned=torch.zeros(8, 32, dtype=torch.bool))
    with pytest.raises(ValueError, match="needs calibration statistics"):
        quantize_layer(W, None, method="gptq", groupsize=32)
    with pytest.raises(ValueError, match="scale_fit='l1' is not supported; allowed: minmax, mse"):
        quantize_layer(W, None, method="rtn", groupsize=32, scale_fit="l1")


def test_encode_rejects_off_grid_weights():
    W = random_weight(rows=8, cols=64)
    r = quantize_layer(W, None, method="rtn", groupsize=32)
    assert torch.equal(int4_grid.encode(r.weight, r.scales, 32), r.qweight)
    off = r.weight.clone()
    off[3, 5] += 1e-3 * float(r.scales[3, 0])
    with pytest.raises(ValueError, match=r"not on the INT4 grid: 1 values.*W\[3, 5\]"):
        int4_grid.encode(off, r.scales, 32)


def test_storage_accounting():
    shape = (576, 1536)
    n = 576 * 1536
    assert layer_storage(shape, groupsize=128).bits_per_weight == pytest.approx(4 + 16 / 128)
    assert layer_storage(shape, groupsize=-1).bits_per_weight == pytest.approx(4 + 16 / 1536)
    assert layer_storage(shape, wbits=16).bits_per_weight == 16
    # 2:4: half the values, a 2-bit index per kept value; 4:8: 3-bit indices.
    assert layer_storage(shape, groupsize=128, nm=(2, 4)).bits_per_weight == pytest.approx(2 + 1 + 0.125)
    assert layer_storage(shape, groupsize=128, nm=(4, 8)).bits_per_weight == pytest.approx(2 + 1.5 + 0.125)
    assert layer_storage(shape, wbits=16, nm=(2, 4)).bits_per_weight == pytest.approx(9)
    # Unstructured: kept values + 1-bit mask, unless dense storage of the zeros is smaller.
    half = layer_storage(shape, groupsize=64, sparsity=0.5)
    assert half.layout == "bitmask" and half.bits_per_weight == pytest.approx(2 + 1 + 0.25)
    mask = torch.rand(shape) < 0.7
    from_mask = layer_storage(shape, groupsize=64, pruned=mask)
    assert from_mask.value_bits == 4 * int((~mask).sum()) and from_mask.meta_bits == n
    assert layer_storage(shape, groupsize=128, sparsity=0.1).layout == "dense"
    assert layer_storage(shape, groupsize=128).nbytes == (4 * n + 576 * 12 * 16) // 8
    both = total_storage([layer_storage(shape, groupsize=128), layer_storage(shape, groupsize=128, nm=(2, 4))])
    assert both.numel == 2 * n and both.bits_per_weight == pytest.approx((4.125 + 3.125) / 2) and both.layout == "mixed"
    assert model_size_bytes([layer_storage(shape, groupsize=128)], 1000) == layer_storage(shape, groupsize=128).nbytes + 1000
    with pytest.raises(ValueError, match="wbits=8 is not supported"):
        layer_storage(shape, wbits=8)
    with pytest.raises(ValueError, match="does not divide"):
        layer_storage((8, 96), groupsize=64)


# The sidecar.

def _states(seed=0):
    W1, W2 = random_weight(16, 128, seed), random_weight(24, 64, seed + 1)
    mask = select_pruned(W1.abs(), SparsityPattern(n=2, m=4))
    return {
        "layers.0.q_proj": quantize_layer(W1, None, method="rtn", groupsize=32, pruned=mask),
        "layers.0.o_proj": quantize_layer(W2, None, method="rtn", groupsize=-1),
    }


def test_sidecar_round_trip_is_exact(tmp_path):
    states = _states()
    file = save_quant_state(str(tmp_path), states, metadata={"wbits": 4, "groupsize": 32})
    assert file == os.path.join(str(tmp_path), "pyprune_int4.safetensors") == sidecar_path(str(tmp_path))
    loaded = load_quant_state(str(tmp_path))
    assert set(loaded) == set(states)
    for name, q in states.items():
        s = loaded[name]
        assert torch.equal(s.qweight, q.qweight) and torch.equal(s.scales, q.scales)
        assert torch.equal(s.pruned, q.pruned) and s.groupsize == q.groupsize
        assert torch.equal(s.dequantize(), q.weight)
    assert read_user_metadata(str(tmp_path)) == {"wbits": 4, "groupsize": 32}


def test_sidecar_applies_to_a_model(tmp_path):
    states = _states()
    model = torch.nn.Module()
    model.layers = torch.nn.Module()
    model.layers.add_module("0", torch.nn.Module())
    block = getattr(model.layers, "0")
    block.q_proj = torch.nn.Linear(128, 16, bias=False)
    block.o_proj = torch.nn.Linear(64, 24, bias=False)
    save_quant_state(str(tmp_path), states)
    apply_quant_state(model, load_quant_state(str(tmp_path)))
    assert torch.equal(block.q_proj.weight.data, states["layers.0.q_proj"].weight)
    assert torch.equal(block.o_proj.weight.data, states["layers.0.o_proj"].weight)
    block.o_proj = torch.nn.Linear(32, 24, bias=False)
    with pytest.raises(QuantStateError, match="module 'layers.0.o_proj' has weight"):
        apply_quant_state(model, load_quant_state(str(tmp_path)))


def test_sidecar_corruption_is_detected(tmp_path):
    file = save_quant_state(str(tmp_path), _states())
    data = bytearray(open(file, "rb").read())
    # A flipped bit in the tensor data keeps the file parseable: the checksum must catch it.
    flipped = bytearray(data)
    flipped[-5] ^= 0x01
    open(file, "wb").write(bytes(flipped))
    with pytest.raises(QuantStateError, match="checksum mismatch"):
        load_quant_state(str(tmp_path))
    open(file, "wb").write(bytes(data[: len(data) // 2]))
    with pytest.raises(QuantStateError, match="corrupt or not a safetensors file"):
        load_quant_state(str(tmp_path))
    os.remove(file)
    with pytest.raises(QuantStateError, match="no INT4 sidecar"):
        load_quant_state(str(tmp_path))


def test_sidecar_missing_or_invalid_tensors(tmp_path):
    states = _states()
    file = save_quant_state(str(tmp_path), states)
    from safetensors.torch import load_file
    from safetensors import safe_open
    tensors = load_file(file)
    with safe_open(file, framework="pt") as f:
        meta = f.metadata()
    del tensors["layers.0.q_proj.pruned"]
    save_file(tensors, file, metadata=meta)
    with pytest.raises(QuantStateError, match="layer 'layers.0.q_proj' has no tensor 'layers.0.q_proj.pruned'"):
        load_quant_state(file)
    with pytest.raises(ValueError, match="codes outside -8..7"):
        bad = _states()["layers.0.o_proj"]
        bad.qweight[0, 0] = 9
        save_quant_state(str(tmp_path / "bad"), {"x": bad})
