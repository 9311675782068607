import pytest
import torch

from pyprune.ops import accumulate_hessian
from pyprune.ops.obs_sweep import QuantSpec
from pyprune.solvers import SOLVERS, LayerStats, SparsityPattern
from pyprune.solvers import sparsegpt
from tests.helpers import correlated_inputs


def layer_problem(out=96, d=256, n=2048, seed=0):
    X = correlated_inputs(n, d, seed)
    W = torch.randn(out, d, generator=torch.Generator().manual_seed(seed + 1))
    H = torch.zeros(d, d)
    count = 0
    for chunk in X.split(500):
        count = accumulate_hessian(H, count, chunk)
    return W, X, LayerStats(H, count)


def recon_error(W, W_new, X):
    return ((W - W_new) @ X.T).pow(2).sum().item() / X.shape[0]


def test_hessian_running_mean_matches_direct_formula():
    _, X, stats = layer_problem()
    direct = 2.0 / X.shape[0] * X.T @ X
    assert stats.nsamples == X.shape[0]
    assert torch.allclose(stats.H, direct, rtol=1e-4, atol=1e-4 * direct.abs().max().item())


@pytest.mark.parametrize("method", sorted(SOLVERS))
@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_unstructured_sparsity_is_exact(method, sparsity):
    W, _, stats = layer_problem()
    result = SOLVERS[method](W, stats, SparsityPattern(sparsity=sparsity))
    assert torch.equal(result.weight == 0, result.pruned)
    if method == "sparsegpt":  # exact per 128-column block
        for start in range(0, W.shape[1], 128):
            block = result.pruned[:, start:start + 128]
            assert block.sum().item() == round(block.numel() * sparsity)
    elif method == "wanda":  # exact per output row
        assert (result.pruned.sum(1) == round(W.shape[1] * sparsity)).all()
    else:
        assert result.pruned.sum().item() == round(W.numel() * sparsity)


@pytest.mark.parametrize("method", sorted(SOLVERS))
@pytest.mark.parametrize("nm", ["2:4", "4:8", "1:4", "3:8"])
def test_nm_pattern_is_exact_in_every_group(method, nm):
    W, _, stats = layer_problem()
    pattern = SparsityPattern.parse(nm)
    result = SOLVERS[method](W, stats, pattern)
    groups = (result.weight != 0).reshape(W.shape[0], -1, pattern.m).sum(-1)
    assert (groups == pattern.n).all()


@pytest.mark.parametrize("pattern", ["0.5", "0.7", "2:4"])
def test_sparsegpt_reconstructs_better_than_magnitude_and_wanda(pattern):
    W, X, stats = layer_problem()
    pattern = SparsityPattern.parse(pattern)
    errors = {name: recon_error(W, SOLVERS[name](W, stats, pattern).weight, X) for name in SOLVERS}
    assert errors["sparsegpt"] < 0.8 * errors["magnitude"]
    assert errors["sparsegpt"] < 0.8 * errors["wanda"]


def test_sparsegpt_reported_loss_is_the_error_it_makes():
    W, X, stats = layer_problem()
    result = sparsegpt.solve(W, stats, SparsityPattern(sparsity=0.6))
    measured = recon_error(W, result.weight, X)
    assert result.loss == pytest.approx(measured, rel=1e-3)
    # the OBS sum along the sweep equals the quadratic form under the dampened Hessian
    dW = W - result.weight
    H = stats.H.clone()
    H += result.info["damp"] * torch.diag(H).mean() * torch.eye(H.shape[0])
    damped = 0.5 * torch.sum(dW @ H * dW).item()
    assert result.info["obs_loss"] == pytest.approx(damped, rel=1e-3)


@pytest.mark.parametrize("pattern", ["0.5", "2:4"])
def test_sparsegpt_final_solve_keeps_the_mask_and_lowers_the_error(pattern):
    W, X, stats = layer_problem()
    pattern = SparsityPattern.parse(pattern)
    greedy = sparsegpt.solve(W, stats, pattern)
    solved = sparsegpt.solve(W, stats, pattern, final_solve=True)
    assert torch.equal(solved.pruned, greedy.pruned)
    assert torch.equal(solved.weight == 0, solved.pruned)
    assert recon_error(W, solved.weight, X) < 0.95 * recon_error(W, greedy.weight, X)
    assert solved.info["final_solve"] and solved.info["final_residual"] < 1e-4
    with pytest.raises(ValueError, match="final_solve re-solves unquantized weights"):
        sparsegpt.solve(W, stats, pattern, final_solve=True, quant=QuantSpec(groupsize=64))


def test_dead_input_columns_get_zero_weight():
    W, X, stats = layer_problem()
    dead = [3, 17, 200]
    X[:, dead] = 0
    H = torch.zeros_like(stats.H)
    accumulate_hessian(H, 0, X)
    result = sparsegpt.solve(W, LayerStats(H, X.shape[0]), SparsityPattern(sparsity=0.5))
    assert result.info["dead_inputs"] == len(dead)
    assert (result.weight[:, dead] == 0).all()
    assert torch.isfinite(result.weight).all()


def test_indefinite_hessian_recovers_through_dampening():
    W, _, stats = layer_problem(d=128)
    H = stats.H.clone()
    H -= 0.05 * torch.diag(H).mean() * torch.eye(H.shape[0])  # smallest eigenvalues now negative
    assert torch.linalg.eigvalsh(H).min() < 0
    result = sparsegpt.solve(W, LayerStats(H, stats.nsamples), SparsityPattern(sparsity=0.5))
    assert result.info["cholesky_attempts"] > 1
    assert result.info["damp"] > 0.01
    assert torch.isfinite(result.weight).all()
    assert result.pruned.float().mean().item() == pytest.approx(0.5)


@pytest.mark.parametrize("bad", ["1.0", "-0.1", "1.5", "4:4", "0:4", "5:4", "abc", "2:"])
def test_bad_patterns_are_refused_with_the_value(bad):
    with pytest.raises(ValueError) as info:
        SparsityPattern.parse(bad)
    assert bad.strip(":") in str(info.value) or bad in str(info.value)


def test_nm_that_does_not_divide_width_is_refused():
    W = torch.randn(8, 20)
    H = torch.eye(20)
    with pytest.raises(ValueError, match="multiple of 8"):
        sparsegpt.solve(W, LayerStats(H, 1), SparsityPattern.parse("4:8"))


def test_same_inputs_same_mask():
    W, _, stats = layer_problem()
    a = sparsegpt.solve(W, stats, SparsityPattern(sparsity=0.5))
    b = sparsegpt.solve(W, stats, SparsityPattern(sparsity=0.5))
    assert torch.equal(a.pruned, b.pruned) and torch.equal(a.weight, b.weight)
