"""ADMM projection/dual op and the ADMM solver (fixed mask, gradual mask, exact final solve)."""
import pytest
import torch

from pyprune.ops.admm_step import admm_step, admm_step_reference
from pyprune.solvers import admm, get_solver, sparsegpt
from pyprune.solvers.base import LayerStats
from pyprune.solvers.pattern import SparsityPattern, select_pruned


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small matrices: a second intra-op thread only adds synchronisation, which on a busy shared
    CPU costs far more than the arithmetic."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def correlated_layer(rows=64, cols=128, tokens=2048, seed=None, dead=()):
    """A random layer and the Hessian of inputs with a non-trivial covariance and uneven scales."""
    g = torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(0, 2**31, ()).item()))
    mix = torch.randn(cols, cols, generator=g) / cols ** 0.5 + 0.5 * torch.eye(cols)
    scale = torch.rand(cols, generator=g) * 3 + 0.1
    scale[:3] *= 10  # outlier features
    X = (torch.randn(tokens, cols, generator=g) @ mix) * scale
    X[:, list(dead)] = 0.0
    W = torch.randn(rows, cols, generator=g)
    return W, LayerStats(2.0 * X.T @ X / tokens, tokens)


def damped_optimum(W, H, pruned, damp):
    """Row by row, the minimiser of (w - w0)(H + damp diag H)(w - w0)^T with w = 0 where pruned:
    the problem the ADMM solver solves (its normalised damping, written in the original space)."""
    H = H.double()
    Hd = H + damp * torch.diag(torch.diag(H))
    out = torch.zeros(W.shape, dtype=torch.float64)
    for i in range(W.shape[0]):
        keep = torch.nonzero(~pruned[i]).flatten()
        if len(keep):
            rhs = (W[i].double() @ Hd)[keep]
            out[i, keep] = torch.linalg.solve(Hd[keep][:, keep], rhs)
    return out


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


# ----------------------------------------------------------------------------- the op


@pytest.mark.parametrize("selection", ["layer", "row", "nm", "fixed"])
def test_admm_step_matches_explicit_formulas(selection):
    rows, cols, rho = 24, 32, 0.7
    W, U = torch.randn(rows, cols), torch.randn(rows, cols)
    U0 = U.clone()
    V = W + U
    if selection == "layer":
        kwargs, expected = {"k": 300}, select_pruned(V.abs(), SparsityPattern(300 / (rows * cols)))
    elif selection == "row":
        kwargs = {"k": 11, "per_row": True}
        expected = select_pruned(V.abs(), SparsityPattern(11 / cols), per_row=True)
    elif selection == "nm":
        kwargs, expected = {"nm": (3, 8)}, select_pruned(V.abs(), SparsityPattern(n=3, m=8))
    else:
        expected = torch.rand(rows, cols) < 0.4
        kwargs = {"pruned": expected.clone()}
    Z, U_new, rhs, pruned = admm_step(W, U, rho, **kwargs)
    assert torch.equal(pruned, expected)
    if selection == "layer":
        assert int(pruned.sum()) == 300
    Z_ref = torch.where(expected, torch.zeros_like(V), V)
    U_ref = U0 + W - Z_ref
    assert torch.allclose(Z, Z_ref) and torch.allclose(U_new, U_ref, atol=1e-6)
    assert torch.allclose(rhs, rho * (Z_ref - U_ref), atol=1e-6)
    assert U_new.data_ptr() == U.data_ptr()  # in place, as the kernel does
    # The selection is made on |W + U|: the kept entries are at least as large as the pruned ones
    # (within a row or group where the selection is local).
    if selection == "layer":
        assert V.abs()[~pruned].min() >= V.abs()[pruned].max()


def test_admm_step_reference_is_the_dispatch_result_on_cpu():
    W, U = torch.randn(16, 16), torch.randn(16, 16)
    a = admm_step(W, U.clone(), 1.0, k=100)
    b = admm_step_reference(W, U.clone(), 1.0, 0, 100, 0, 0, None)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_admm_step_rejects_bad_arguments():
    W, U = torch.randn(8, 16), torch.randn(8, 16)
    with pytest.raises(ValueError, match="exactly one"):
        admm_step(W, U, 1.0, k=3, nm=(2, 4))
    with pytest.raises(ValueError, match="k=200"):
        admm_step(W, U, 1.0, k=200)
    with pytest.raises(ValueError, match="5:4"):
        admm_step(W, U, 1.0, nm=(5, 4))
    with pytest.raises(ValueError, match="float32"):
        admm_step(W.double(), U, 1.0, k=3)


# ----------------------------------------------------------------------------- fixed mask


def test_fixed_mask_admm_converges_to_the_masked_optimum():
    W, stats = correlated_layer()
    pattern = SparsityPattern(0.6)
    damp = 0.1
    runs = {it: admm.solve(W, stats, pattern, mask="wanda", iters=it, final_solve=False) for it in (2, 10, 40, 200)}
    mask = runs[2].pruned
    assert all(torch.equal(r.pruned, mask) for r in runs.values())
    optimum = damped_optimum(W, stats.H, mask, damp)
    dist = {it: rel(r.weight, optimum) for it, r in runs.items()}
    assert dist[2] > dist[10] > dist[40] > dist[200], dist
    assert dist[200] < 1e-3, dist
    for method in ("cg", "cholesky"):
        exact = admm.solve(W, stats, pattern, mask="wanda", iters=2, final_method=method)
        assert rel(exact.weight, optimum) < 1e-4, method
        assert torch.equal(exact.pruned, mask) and bool((exact.weight[mask] == 0).all())
        assert exact.loss < runs[2].loss
        assert exact.info["final_solve_gain"] > 0 and exact.info["final_method"] == method
    assert exact.info["admm_loss"] == pytest.approx(runs[2].loss, rel=1e-6)


def test_exact_solve_is_stationary_on_the_kept_support():
    W, stats = correlated_layer(rows=32, cols=64)
    pruned = torch.rand(W.shape) < 0.7
    Hd = stats.H + 0.05 * torch.diag(torch.diag(stats.H))
    for method in ("cholesky", "cg"):
        W_new, info = admm.exact_solve(W, stats, pruned, damp=0.05, method=method)
        grad = (W_new - W) @ Hd  # the gradient must vanish on every kept weight
        assert float(grad[~pruned].abs().max()) < 1e-4 * float((W @ Hd).abs().max()), method
        assert bool((W_new[pruned] == 0).all())
    assert info["iterations"] > 0


# ----------------------------------------------------------------------------- gradual mask


@pytest.mark.parametrize("sparsity", [0.6, 0.7, 0.8])
def test_admm_grad_beats_sparsegpt(sparsity):
    W, stats = correlated_layer(rows=96, cols=128)
    pattern = SparsityPattern(sparsity)
    ours = admm.solve(W, stats, pattern)
    theirs = sparsegpt.solve(W, stats, pattern)
    assert ours.loss < 0.9 * theirs.loss, (ours.loss, theirs.loss)
    # the final solve lands on the optimum of the damped problem for the chosen mask
    optimum = damped_optimum(W, stats.H, ours.pruned, 0.1)
    assert rel(ours.weight, optimum) < 1e-4
    assert ours.info["final_iterations"] < 100


@pytest.mark.parametrize("reselect", ["schedule", "final"])
@pytest.mark.parametrize("per_row", [False, True])
def test_unstructured_sparsity_is_exact(reselect, per_row):
    W, stats = correlated_layer(rows=40, cols=96)
    res = admm.solve(W, stats, SparsityPattern(0.7), reselect=reselect, per_row=per_row)
    if per_row:
        assert bool((res.pruned.sum(1) == round(0.7 * 96)).all())
    else:
        assert int(res.pruned.sum()) == round(0.7 * W.numel())
    assert bool((res.weight[res.pruned] == 0).all())
    assert bool((res.weight[~res.pruned] != 0).all())
    assert res.info["reselect"] == reselect and res.info["iterations"] == 20


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
@pytest.mark.parametrize("mask", ["gradual", "wanda", "magnitude"])
def test_nm_patterns_are_exact(n, m, mask):
    W, stats = correlated_layer(rows=32, cols=64)
    res = admm.solve(W, stats, SparsityPattern(n=n, m=m), mask=mask)
    kept = (~res.pruned).reshape(32, -1, m).sum(-1)
    assert bool((kept == n).all())
    assert bool((res.weight[res.pruned] == 0).all())


def test_4_8_stays_4_8():
    W, stats = correlated_layer(rows=64, cols=128)
    res48 = admm.solve(W, stats, SparsityPattern(n=4, m=8))
    res24 = admm.solve(W, stats, SparsityPattern(n=2, m=4))
    halves = (~res48.pruned).reshape(64, -1, 4).sum(-1)
    assert bool((halves != 2).any()), "every half-group keeps 2: the 4:8 mask was turned into 2:4"
    assert res48.loss < res24.loss  # the looser pattern must be used


def test_dead_inputs_get_zero_weights():
    dead = (5, 17, 40)
    W, stats = correlated_layer(rows=32, cols=64, dead=dead)
    assert bool((torch.diag(stats.H)[list(dead)] == 0).all())
    for mask in ("gradual", "wanda"):
        res = admm.solve(W, stats, SparsityPattern(0.5), mask=mask)
        assert bool(torch.isfinite(res.weight).all())
        assert bool((res.weight[:, list(dead)] == 0).all())
        assert res.info["dead_inputs"] == 3
        assert res.loss < sparsegpt.solve(W, stats, SparsityPattern(0.5)).loss


def test_same_inputs_same_result_and_dtype_kept():
    W, stats = correlated_layer(rows=16, cols=32)
    a = admm.solve(W.to(torch.bfloat16), stats, SparsityPattern(0.5))
    b = admm.solve(W.to(torch.bfloat16), stats, SparsityPattern(0.5))
    assert a.weight.dtype == torch.bfloat16
    assert torch.equal(a.pruned, b.pruned) and torch.equal(a.weight, b.weight)


def test_registered_and_rejects_bad_options():
    assert get_solver("admm") is admm.solve
    W, stats = correlated_layer(rows=8, cols=16)
    p = SparsityPattern(0.5)
    for kwargs, text in [({"mask": "random"}, "mask='random'"), ({"reselect": "never"}, "reselect"),
                         ({"iters": 0}, "iters=0"), ({"mask_steps": 30}, "mask_steps=30"),
                         ({"rho": 0.0}, "rho=0.0"), ({"damp": -1.0}, "damp=-1.0"),
                         ({"final_method": "lu"}, "final_method"), ({"precision": "bf16"}, "precision='bf16'"),
                         ({"quant": object()}, "quantize")]:
        with pytest.raises(ValueError, match=text):
            admm.solve(W, stats, p, **kwargs)
    with pytest.raises(ValueError, match="Hessian"):
        admm.solve(W, LayerStats(), p)
    with pytest.raises(ValueError, match="multiple of 8"):
        admm.solve(torch.randn(8, 12), LayerStats(torch.eye(12), 1), SparsityPattern(n=4, m=8))


@pytest.mark.parametrize("precision", ["tf32", "fp16"])
def test_reduced_precision_is_recorded_and_a_no_op_on_cpu(precision):
    W, stats = correlated_layer(rows=32, cols=64)
    a = admm.solve(W, stats, SparsityPattern(0.6))
    b = admm.solve(W, stats, SparsityPattern(0.6), precision=precision)
    assert b.info["precision"] == precision and a.info["precision"] == "fp32"
    assert torch.equal(a.pruned, b.pruned) and torch.equal(a.weight, b.weight)


def test_primal_update_without_the_base_term_matches_the_normal_equations():
    """W0 + (rho (Z - U) - rho W0) A^-1 is the solution of W A = W0 Hd + rho (Z - U)."""
    torch.manual_seed(0)
    W0, Z, U = torch.randn(6, 10, dtype=torch.float64), torch.randn(6, 10, dtype=torch.float64), torch.randn(6, 10, dtype=torch.float64)
    X = torch.randn(40, 10, dtype=torch.float64)
    Hd, rho = X.t() @ X / 40 + 0.1 * torch.eye(10, dtype=torch.float64), 0.7
    A = Hd + rho * torch.eye(10, dtype=torch.float64)
    primal = admm._primal_solver(W0, torch.linalg.inv(A), rho, "fp32")
    W = primal(rho * (Z - U))
    assert torch.allclose(W @ A, W0 @ Hd + rho * (Z - U), atol=1e-10)


@pytest.mark.cuda
def test_tf32_iterations_stay_close_to_fp32_on_cuda():
    W, stats = correlated_layer(rows=256, cols=512)
    W, stats = W.cuda(), LayerStats(stats.H.cuda(), stats.nsamples)
    before = torch.backends.cuda.matmul.allow_tf32
    fp32 = admm.solve(W, stats, SparsityPattern(0.7), final_solve=False)
    tf32 = admm.solve(W, stats, SparsityPattern(0.7), final_solve=False, precision="tf32")
    assert torch.backends.cuda.matmul.allow_tf32 == before
    assert (tf32.pruned != fp32.pruned).float().mean() < 0.02
    assert tf32.loss < 1.02 * fp32.loss


@pytest.mark.cuda
def test_fp16_iterations_stay_close_to_fp32_on_cuda():
    W, stats = correlated_layer(rows=256, cols=512)
    W, stats = W.cuda() * 1e3, LayerStats(stats.H.cuda(), stats.nsamples)  # large weights: the row scaling matters
    fp32 = admm.solve(W, stats, SparsityPattern(0.7), final_solve=False)
    fp16 = admm.solve(W, stats, SparsityPattern(0.7), final_solve=False, precision="fp16")
    assert torch.isfinite(fp16.weight).all()
    assert (fp16.pruned != fp32.pruned).float().mean() < 0.02
    assert fp16.loss < 1.02 * fp32.loss
