"""GPTQ, act-order with static groups, mask-preserving GPTQ and joint SparseGPT + INT4."""
import pytest
import torch

from pyprune.ops import int4_grid
from pyprune.ops.hessian import accumulate_hessian
from pyprune.solvers import magnitude, sparsegpt, wanda
from pyprune.solvers.base import LayerStats, reconstruction_loss
from pyprune.solvers.pattern import SparsityPattern
from pyprune.solvers.quantize import (
    LayerQuantizer, no_pruning, prune_and_quantize, quantize_layer, sparsegpt_int4_solver,
)

try:
    from pyprune.solvers import admm
except ImportError:  # pragma: no cover - the ADMM solver is optional here
    admm = None

ROWS, COLS = 48, 256


def correlated_stats(cols=COLS, n=1024, seed=0):
    """Inputs with strongly correlated features and uneven per-feature scales."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols ** 0.5 + 0.3 * torch.eye(cols)
    X = torch.randn(n, cols, generator=g).matmul(mix) * torch.rand(cols, generator=g).mul(3).add(0.2)
    H = torch.zeros(cols, cols)
    accumulate_hessian(H, 0, X)
    return LayerStats(H, n)


def random_weight(rows=ROWS, cols=COLS, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g)


@pytest.fixture(scope="module")
def stats():
    return correlated_stats()


@pytest.fixture(scope="module")
def W():
    return random_weight()


def assert_on_grid(result):
    codes, scales, g = result.qweight, result.scales, result.groupsize
    assert codes.dtype == torch.int8 and int(codes.min()) >= -8 and int(codes.max()) <= 7
    assert (scales != 0).all() and torch.equal(scales.to(torch.float16).float(), scales)
    assert torch.equal(result.weight, codes.float() * scales.repeat_interleave(g, dim=1))


@pytest.mark.parametrize("groupsize", [64, 128, -1])
def test_gptq_beats_rtn(W, stats, groupsize):
    rtn = quantize_layer(W, stats, method="rtn", groupsize=groupsize)
    gptq = quantize_layer(W, stats, method="gptq", groupsize=groupsize)
    act = quantize_layer(W, stats, method="gptq", groupsize=groupsize, act_order=True)
    for r in (gptq, act):
        assert_on_grid(r)
        assert r.loss == pytest.approx(reconstruction_loss(W, r.weight, stats.H), rel=1e-6)
        assert r.loss < 0.8 * rtn.loss, (groupsize, r.info, rtn.loss)
    assert not torch.equal(act.weight, gptq.weight)


@pytest.mark.parametrize("pattern", [None, SparsityPattern(0.5), SparsityPattern(n=2, m=4)])
def test_mse_scales_lower_the_loss(W, stats, pattern):
    def run(scale_fit, act_order=False):
        if pattern is None:
            return quantize_layer(W, stats, method="gptq", groupsize=64, scale_fit=scale_fit, act_order=act_order)
        return prune_and_quantize(W, stats, pattern, groupsize=64, scale_fit=scale_fit)

    minmax, mse = run("minmax"), run("mse")
    assert_on_grid(mse)
    assert mse.info["scale_fit"] == "mse"
    # Joint runs also carry the (much larger) pruning loss, which the scales do not change.
    assert mse.loss < (0.95 if pattern is None else 0.99) * minmax.loss, (minmax.loss, mse.loss)
    if pattern is not None:
        assert float(mse.pruned.float().mean()) == pytest.approx(0.5)
    else:  # static act-order scales too
        assert run("mse", act_order=True).loss < run("minmax", act_order=True).loss


@pytest.mark.parametrize("pattern", [None, SparsityPattern(0.5)])
def test_signed_scales_lower_the_loss(W, stats, pattern):
    def run(scale_fit):
        if pattern is None:
            return quantize_layer(W, stats, method="gptq", groupsize=64, scale_fit=scale_fit, act_order=True)
        return prune_and_quantize(W, stats, pattern, groupsize=64, scale_fit=scale_fit)

    minmax, signed = run("minmax"), run("signed")
    assert_on_grid(signed)
    assert (signed.scales < 0).any() and (signed.scales > 0).any()
    assert signed.loss < (0.9 if pattern is None else 0.99) * minmax.loss, (minmax.loss, signed.loss)


def test_mse_fitted_in_the_sweep_skips_the_fused_kernel():
    from pyprune.ops.obs_sweep import QuantSpec, _kernel_fits

    W1 = torch.zeros(8, 128)
    assert _kernel_fits(W1, None, QuantSpec(64))
    assert _kernel_fits(W1, None, QuantSpec(64, scale_fit="signed"))
    assert not _kernel_fits(W1, None, QuantSpec(64, scale_fit="mse"))  # the kernel has no mse search
    assert not _kernel_fits(W1, None, QuantSpec(64, scale_fit="signed-mse"))
    static = QuantSpec(64, static_scales=torch.ones(8, 2), group_of_column=torch.arange(128) // 64, scale_fit="mse")
    assert _kernel_fits(W1, None, static)  # static scales were fitted before the sweep


def test_act_order_groups_are_static_and_contiguous(W, stats):
    g = 64
    act = quantize_layer(W, stats, method="gptq", groupsize=g, act_order=True)
    # Every group of g original columns shares one scale per row: the weights of group k divided by
    # scale k are integers in -8..7, and the scale is the min-max fit on the original weights.
    assert torch.equal(act.scales, int4_grid.fit_group_scales(W, g))
    for k in range(COLS // g):
        block = act.weight[:, k * g:(k + 1) * g] / act.scales[:, k:k + 1]
        assert torch.equal(block, block.round()) and block.abs().max() <= 8
    # The sweep order really was permuted (highest Hessian diagonal first): quantizing in the
    # original order with the same static scales gives a different result.
    perm = torch.argsort(torch.diag(stats.H), descending=True)
    assert not torch.equal(perm, torch.arange(COLS))


def test_dead_inputs_get_zero_weight(W):
    stats = correlated_stats()
    H = stats.H.clone()
    H[7, :] = 0.0
    H[:, 7] = 0.0
    for act_order in (False, True):
        r = quantize_layer(W, LayerStats(H, stats.nsamples), method="gptq", groupsize=64, act_order=act_order)
        assert (r.weight[:, 7] == 0).all() and r.info["dead_inputs"] == 1
        assert_on_grid(r)


def test_gptq_refuses_bad_shapes(W, stats):
    with pytest.raises(ValueError, match=r"Hessian must be \[128, 128\]"):
        quantize_layer(W[:, :128], stats, method="gptq", groupsize=64)
    with pytest.raises(ValueError, match="groupsize=128 does not divide the layer width 320"):
        quantize_layer(random_weight(8, 320), correlated_stats(320, 400), method="gptq", groupsize=128)
    with pytest.raises(ValueError, match="groupsize=128 does not divide"):
        prune_and_quantize(random_weight(8, 320), correlated_stats(320, 400), SparsityPattern(0.5), groupsize=128)


def _pruners(stats):
    """name -> function(W, pattern) -> (W_pruned, mask) for every pruning method available."""
    pruners = {
        "magnitude": lambda W, p: magnitude.solve(W, stats, p),
        "wanda": lambda W, p: wanda.solve(W, stats, p),
        "sparsegpt": lambda W, p: sparsegpt.solve(W, stats, p),
    }
    if admm is not None:
        pruners["admm"] = lambda W, p: admm.solve(W, stats, p, iters=6, mask_steps=4)
    return pruners


@pytest.mark.parametrize("pattern", ["0.6", "2:4"])
def test_mask_is_bit_identical_for_every_method(W, stats, pattern):
    pattern = SparsityPattern.parse(pattern)
    for name, prune in _pruners(stats).items():
        pruned = prune(W, pattern)
        mask = pruned.pruned.clone()
        # The pruned weights, or (gptq only) the dense weights plus the mask.
        runs = [(pruned.weight, "rtn", False), (pruned.weight, "gptq", False), (pruned.weight, "gptq", True),
                (W, "gptq", False)]
        for source, method, act_order in runs:
            r = quantize_layer(source, stats, method=method, groupsize=64, act_order=act_order, pruned=mask)
            assert torch.equal(r.pruned, mask), (name, method, act_order)
            assert (r.weight[mask] == 0).all() and (r.qweight[mask] == 0).all(), (name, method)
            assert_on_grid(r)
        assert torch.equal(pruned.pruned, mask)  # the mask given was not modified


def test_mask_preserving_gptq_beats_rtn(W, stats):
    pruned = wanda.solve(W, stats, SparsityPattern(0.5))
    for g in (64, -1):
        rtn = quantize_layer(pruned.weight, stats, method="rtn", groupsize=g, pruned=pruned.pruned)
        gptq = quantize_layer(pruned.weight, stats, method="gptq", groupsize=g, pruned=pruned.pruned)
        assert gptq.loss < 0.9 * rtn.loss
        # Error against the dense weights too: compensation only helps.
        assert reconstruction_loss(W, gptq.weight, stats.H) < reconstruction_loss(W, rtn.weight, stats.H)


def test_mask_preserving_per_channel_scale_ignores_pruned(W, stats):
    """A per-channel group spans several 128-column blocks; pruned weights in later blocks must
    not widen its scale."""
    cols = 384
    stats = correlated_stats(cols, 1200)
    W = random_weight(16, cols)
    mask = torch.zeros_like(W, dtype=torch.bool)
    mask[:, 300] = True
    W[:, 300] = 50.0
    r = quantize_layer(W, stats, method="gptq", groupsize=-1, pruned=mask)
    assert float(r.scales.max()) < 2.0
    assert (r.weight[:, 300] == 0).all() and torch.equal(r.pruned, mask)


@pytest.mark.parametrize("pattern", ["0.5", "2:4"])
def test_joint_sparsegpt_int4(W, stats, pattern):
    pattern = SparsityPattern.parse(pattern)
    joint = prune_and_quantize(W, stats, pattern, groupsize=64)
    assert_on_grid(joint)
    mask = joint.pruned
    assert (joint.weight[mask] == 0).all() and (joint.qweight[mask] == 0).all()
    if pattern.is_nm:
        assert (mask.reshape(ROWS, -1, 4).sum(dim=2) == 2).all()
    else:
        assert int(mask.sum()) == W.numel() // 2
    # Quantizing inside the sweep beats pruning first and rounding afterwards.
    sparse = sparsegpt.solve(W, stats, pattern)
    rtn_after = quantize_layer(sparse.weight, stats, method="rtn", groupsize=64, pruned=sparse.pruned)
    assert joint.loss < reconstruction_loss(W, rtn_after.weight, stats.H)
    # The joint result is exactly what sparsegpt's own quantized sweep gives.
    from pyprune.ops.obs_sweep import QuantSpec
    direct = sparsegpt.solve(W, stats, pattern, quant=QuantSpec(groupsize=64))
    assert torch.equal(direct.pruned, mask) and torch.equal(direct.weight, joint.weight)
    assert torch.equal(direct.info["scales"], joint.scales)


def test_joint_per_channel_on_a_width_not_multiple_of_the_block():
    stats = correlated_stats(192, 600)
    W = random_weight(16, 192)
    joint = prune_and_quantize(W, stats, SparsityPattern(n=2, m=4), groupsize=-1)
    assert_on_grid(joint)
    assert joint.scales.shape == (16, 1)
    assert (joint.pruned.reshape(16, -1, 4).sum(dim=2) == 2).all()


def test_layer_quantizer_after_a_solver(W, stats):
    pattern = SparsityPattern(n=2, m=4)
    quantizer = LayerQuantizer("gptq", groupsize=64, nm=(2, 4))
    result = wanda.solve(W, stats, pattern)
    weight, fields = quantizer("layers.0.q_proj", result.weight, result, stats)
    q = quantizer.results["layers.0.q_proj"]
    assert torch.equal(q.pruned, result.pruned) and torch.equal(weight, q.dequantize())
    assert fields["bits_per_weight"] == pytest.approx(2 + 1 + 16 / 64) and fields["storage_layout"] == "2:4"
    # The joint solver's result is recorded as is (no second quantization).
    joint = sparsegpt_int4_solver(64)(W, stats, pattern)
    weight2, fields2 = quantizer("layers.0.k_proj", joint.weight, joint, stats)
    assert torch.equal(weight2, joint.info["quant_result"].weight)
    assert fields2["quant_method"] == "sparsegpt+gptq"
    assert quantizer.storage().numel == 2 * W.numel()
    # Quantization only.
    dense = no_pruning(W, stats, None)
    weight3, fields3 = LayerQuantizer("rtn", groupsize=-1)("x", dense.weight, dense, None)
    assert fields3["storage_layout"] == "dense" and not (weight3 == W).all()


@pytest.mark.cuda
def test_gptq_on_cuda_matches_the_reference(W, stats):
    ref = quantize_layer(W, stats, method="gptq", groupsize=64)
    gpu = quantize_layer(W.cuda(), LayerStats(stats.H.cuda(), stats.nsamples), method="gptq", groupsize=64)
    assert_on_grid(gpu)
    assert abs(gpu.loss - ref.loss) / ref.loss < 0.05
    joint_ref = prune_and_quantize(W, stats, SparsityPattern(0.5), groupsize=64)
    joint_gpu = prune_and_quantize(W.cuda(), LayerStats(stats.H.cuda(), stats.nsamples), SparsityPattern(0.5), groupsize=64)
    assert abs(joint_gpu.loss - joint_ref.loss) / joint_ref.loss < 0.05
    assert int(joint_gpu.pruned.sum()) == int(joint_ref.pruned.sum())
    mse_ref = quantize_layer(W, stats, method="gptq", groupsize=64, scale_fit="mse")
    mse_gpu = quantize_layer(W.cuda(), LayerStats(stats.H.cuda(), stats.nsamples), method="gptq", groupsize=64,
                             scale_fit="mse")
    assert_on_grid(mse_gpu)
    assert abs(mse_gpu.loss - mse_ref.loss) / mse_ref.loss < 0.05
