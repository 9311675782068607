"""Refinement of INT4 codes and scales after the sweep (``pyprune.ops.int4_refine``)."""
import pytest
import torch

from pyprune.ops import int4_grid, int4_refine
from pyprune.solvers import sparsegpt
from pyprune.solvers.pattern import SparsityPattern
from pyprune.solvers.base import SolverResult
from pyprune.solvers.quantize import LayerQuantizer, prune_and_quantize, quantize_layer
from tests.test_gptq import assert_on_grid, correlated_stats, random_weight

STATS = correlated_stats()
WEIGHT = random_weight()


def _loss(W, codes, scales, g, H):
    return float(int4_refine._row_losses(W, codes, scales, g, H).sum())


@pytest.mark.parametrize("groupsize", [32, 64, -1])
@pytest.mark.parametrize("act_order", [False, True])
def test_refinement_lowers_gptq_loss_and_stays_on_grid(groupsize, act_order):
    W, stats = WEIGHT, STATS
    plain = quantize_layer(W, stats, method="gptq", groupsize=groupsize, act_order=act_order)
    refined = quantize_layer(W, stats, method="gptq", groupsize=groupsize, act_order=act_order, refine_rounds=2)
    assert_on_grid(refined)
    assert refined.info["refine_rounds"] == 2
    assert refined.info["refine_loss_ratio"] < 0.99  # on the dampened objective
    assert refined.loss < 0.99 * plain.loss  # on the raw one, measured independently
    assert not torch.equal(refined.scales, plain.scales)  # the scale solve moved some scales


def test_refinement_keeps_the_sign_of_signed_scales():
    W, stats = WEIGHT, STATS
    plain = prune_and_quantize(W, stats, SparsityPattern(0.5), groupsize=64, scale_fit="signed")
    refined = prune_and_quantize(W, stats, SparsityPattern(0.5), groupsize=64, scale_fit="signed", refine_rounds=2)
    assert_on_grid(refined)
    assert torch.equal(torch.sign(refined.scales), torch.sign(plain.scales)) and (plain.scales < 0).any()
    assert not torch.equal(refined.scales, plain.scales)
    assert refined.loss < plain.loss


def test_each_round_never_raises_the_loss():
    W, stats = WEIGHT, STATS
    H = int4_refine.dampened(stats.H, 0.01)
    start = quantize_layer(W, stats, method="gptq", groupsize=64)
    codes, scales = start.qweight, start.scales
    losses = [_loss(W, codes, scales, 64, H)]
    for _ in range(4):
        step = int4_refine.refine(W, codes, scales, 64, H, rounds=1)
        assert step.loss_before == pytest.approx(losses[-1], rel=1e-5)
        codes, scales = step.codes, step.scales
        losses.append(_loss(W, codes, scales, 64, H))
    assert all(b <= a * (1 + 1e-6) for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < losses[0]


def test_code_pass_lowers_the_loss_and_leaves_the_last_column_at_its_best_code():
    """From a poor start a pass lowers the loss; in the last column it visits (nothing moves after
    it) every row holds the best of the 16 codes, found here by trying them all."""
    g = torch.Generator().manual_seed(3)
    rows, cols = 5, 16
    H = correlated_stats(cols, n=256, seed=4).H
    H = int4_refine.dampened(H, 0.01)
    W = torch.randn(rows, cols, generator=g)
    scales = int4_grid.fit_group_scales(W, -1)
    codes = torch.zeros(rows, cols, dtype=torch.int8)  # a poor start
    before = _loss(W, codes, scales, cols, H)
    int4_refine._code_pass(W, codes, scales, cols, H, None)
    after = _loss(W, codes, scales, cols, H)
    assert after < before
    # The last column is visited last, so nothing moves after it: its codes must be optimal.
    j = cols - 1
    for r in range(rows):
        best = min(range(-8, 8), key=lambda q: _loss(W[r:r + 1], _with(codes[r:r + 1], j, q), scales[r:r + 1],
                                                        cols, H))
        assert int(codes[r, j]) == best


def _with(codes, j, q):
    out = codes.clone()
    out[:, j] = q
    return out


def test_scale_solve_recovers_exact_scales():
    """Codes fixed and W exactly on a grid: least squares finds that grid's scales from wrong ones."""
    g = torch.Generator().manual_seed(5)
    rows, cols, gs = 6, 128, 32
    codes = torch.randint(-8, 8, (rows, cols), generator=g, dtype=torch.int8)
    true = (torch.rand(rows, cols // gs, generator=g) + 0.5).to(torch.float16).float()
    W = codes.float() * int4_grid.expand_scales(true, gs)
    H = correlated_stats(cols, n=512, seed=6).H
    wrong = (true * 1.3).to(torch.float16).float()
    solved = int4_refine._solve_scales(W, codes, wrong, gs, H)
    assert torch.equal(solved, true)


def test_scale_solve_keeps_scales_of_empty_groups_and_never_worsens_a_row():
    g = torch.Generator().manual_seed(7)
    rows, cols, gs = 4, 64, 32
    W = torch.randn(rows, cols, generator=g)
    scales = int4_grid.fit_group_scales(W, gs)
    codes = int4_grid.quantize_groups(W, scales, gs)
    codes[:, :gs] = 0  # group 0 holds no nonzero code
    H = correlated_stats(cols, n=256, seed=8).H
    solved = int4_refine._solve_scales(W, codes, scales, gs, H)
    assert torch.equal(solved[:, 0], scales[:, 0])
    assert (int4_refine._row_losses(W, codes, solved, gs, H)
            <= int4_refine._row_losses(W, codes, scales, gs, H)).all()


@pytest.mark.parametrize("pattern", [SparsityPattern(0.5), SparsityPattern(n=2, m=4)])
def test_refinement_keeps_the_mask(pattern):
    W, stats = WEIGHT, STATS
    pruned = sparsegpt.solve(W, stats, pattern)
    after = quantize_layer(pruned.weight, stats, method="gptq", groupsize=64, act_order=True,
                           pruned=pruned.pruned, refine_rounds=2)
    assert torch.equal(after.pruned, pruned.pruned)
    assert not after.qweight[pruned.pruned].any()
    joint = prune_and_quantize(W, stats, pattern, groupsize=64, refine_rounds=2)
    plain = prune_and_quantize(W, stats, pattern, groupsize=64)
    assert torch.equal(joint.pruned, plain.pruned)  # refinement runs on the sweep's final mask
    assert not joint.qweight[joint.pruned].any()
    assert joint.loss < plain.loss
    assert_on_grid(after)
    assert_on_grid(joint)


def _loss_against(target, weight, H):
    dW = target - weight
    return float((dW.matmul(H) * dW).sum())


def test_refinement_aimed_at_the_original_weight_takes_up_pruning_error():
    """Magnitude pruning leaves all its error uncompensated: aimed at the weight before pruning,
    the refinement lowers the error against it well below the refinement aimed at the pruned one."""
    W, stats = WEIGHT, STATS
    pruned = W.abs() < W.abs().median(dim=1, keepdim=True).values
    W_pruned = W.masked_fill(pruned, 0.0)
    options = dict(method="gptq", groupsize=64, act_order=True, pruned=pruned, refine_rounds=2)
    to_pruned = quantize_layer(W_pruned, stats, **options)
    to_original = quantize_layer(W_pruned, stats, refine_target=W, **options)
    assert torch.equal(to_original.pruned, pruned)
    assert not to_original.qweight[pruned].any()
    assert_on_grid(to_original)
    H = stats.H
    assert _loss_against(W, to_original.weight, H) < 0.9 * _loss_against(W, to_pruned.weight, H)
    # and each is the better one on its own target
    assert _loss_against(W_pruned, to_pruned.weight, H) < _loss_against(W_pruned, to_original.weight, H)


def test_layer_quantizer_aims_the_refinement_at_the_hooks_original_weight():
    W, stats = WEIGHT, STATS
    pruned = W.abs() < W.abs().median(dim=1, keepdim=True).values
    W_pruned = W.masked_fill(pruned, 0.0)
    solver_result = SolverResult(W_pruned, pruned, 0.0, {})
    expected = quantize_layer(W_pruned, stats, method="gptq", groupsize=64, pruned=pruned, refine_rounds=1,
                              refine_target=W)
    quantizer = LayerQuantizer("gptq", 64, refine_rounds=1)  # "original" is the default
    weight, _ = quantizer("layer", W_pruned, solver_result, stats, original=W)
    assert torch.equal(weight, expected.weight)
    to_pruned = LayerQuantizer("gptq", 64, refine_target="pruned", refine_rounds=1)
    weight, _ = to_pruned("layer", W_pruned, solver_result, stats, original=W)
    assert not torch.equal(weight, expected.weight)
    with pytest.raises(ValueError, match=r"refine_target='dense'; allowed: original, pruned"):
        LayerQuantizer("gptq", 64, refine_target="dense")
    with pytest.raises(ValueError, match=r"refine_target must have W's shape \(48, 256\), got \(48, 64\)"):
        quantize_layer(W_pruned, stats, method="gptq", groupsize=64, refine_rounds=1, refine_target=W[:, :64])


def test_bad_refine_rounds_are_refused():
    W, stats = WEIGHT, STATS
    with pytest.raises(ValueError, match=r"refine_rounds=-1: must be an integer >= 0"):
        quantize_layer(W, stats, method="gptq", groupsize=64, refine_rounds=-1)
    with pytest.raises(ValueError, match="refine_rounds is a GPTQ option; method='rtn'"):
        quantize_layer(W, stats, method="rtn", groupsize=64, refine_rounds=2)


@pytest.mark.cuda
def test_refinement_on_gpu_matches_the_cpu_loss():
    W, stats = WEIGHT, STATS
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    cpu = quantize_layer(W, stats, method="gptq", groupsize=64, act_order=True, refine_rounds=2)
    gpu = quantize_layer(W.cuda(), type(stats)(stats.H.cuda(), stats.nsamples), method="gptq", groupsize=64,
                         act_order=True, refine_rounds=2)
    assert_on_grid(gpu)
    assert gpu.loss == pytest.approx(cpu.loss, rel=2e-2)
