"""The CUDA kernels of ``pyprune._C`` against the PyTorch references, on the GPU.

Every test runs the public op twice on the same fresh random input: once with the kernel (the
default for CUDA tensors) and once with ``PYPRUNE_FORCE_REFERENCE=1``. The kernels mirror the
reference's rounding step by step, so masks must be identical and weights agree far below the
1e-4 relative tolerance. Skipped without a GPU; fails (instead of comparing the reference with
itself) when the extension is expected (``PYPRUNE_EXPECT_EXTENSION=1``) but did not load.
"""
import os
import random

import pytest
import torch

from pyprune.ops import _extension, int4_grid
from pyprune.ops.admm_step import admm_step, admm_step_reference
from pyprune.ops.hessian import CholeskyError, accumulate_hessian, inverse_hessian_factor
from pyprune.ops.obs_sweep import QuantSpec, obs_sweep

pytestmark = pytest.mark.cuda

DEV = "cuda"


@pytest.fixture(autouse=True)
def _extension_loaded(monkeypatch):
    monkeypatch.delenv(_extension.FORCE_REFERENCE_ENV, raising=False)
    if _extension.load_extension() is None:
        reason = f"pyprune._C is not available: {_extension.extension_error()}"
        if os.environ.get(_extension.EXPECT_EXTENSION_ENV) == "1":
            pytest.fail(reason)
        pytest.skip(reason)


def fresh_seed():
    seed = random.randrange(2**31)
    torch.manual_seed(seed)
    return seed


def rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def run_both(monkeypatch, fn):
    """(kernel result, reference result) of ``fn()``."""
    assert _extension.kernel_for(torch.empty(1, device=DEV)) is not None
    got = fn()
    monkeypatch.setenv(_extension.FORCE_REFERENCE_ENV, "1")
    assert _extension.kernel_for(torch.empty(1, device=DEV)) is None
    want = fn()
    monkeypatch.delenv(_extension.FORCE_REFERENCE_ENV)
    return got, want


def random_hessian(cols, tokens=None, dead=()):
    X = torch.randn(tokens or 4 * cols, cols, device=DEV)
    X[:, list(dead)] = 0.0
    return 2.0 * X.t() @ X / X.shape[0]


def reference_factor(H, damp=0.01):
    import pyprune.ops.hessian as hessian

    return hessian._inverse_hessian_factor_reference(H, damp, 4).U


# ---- Hessian accumulation -------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cols,batches", [(64, (1, 37)), (200, (130, 7)), (130, (300,)), (576, (64, 129))])
def test_accumulate_hessian_matches_reference(monkeypatch, dtype, cols, batches):
    seed = fresh_seed()
    xs = [torch.randn(b, cols, device=DEV).to(dtype) for b in batches]

    def run():
        H = torch.zeros(cols, cols, device=DEV)
        n = 0
        for x in xs:
            n = accumulate_hessian(H, n, x)
        return H, n

    (Hk, nk), (Hr, nr) = run_both(monkeypatch, run)
    assert nk == nr == sum(batches)
    assert rel(Hk, Hr) < 2e-6, f"seed {seed}: relative error {rel(Hk, Hr):.3g}"
    assert torch.equal(Hk, Hk.t()), f"seed {seed}: kernel result is not symmetric"


def test_accumulate_hessian_batched_input_and_running_mean(monkeypatch):
    seed = fresh_seed()
    cols = 96
    x = torch.randn(3, 50, cols, device=DEV, dtype=torch.bfloat16)  # [batch, seq, in]
    H0 = random_hessian(cols)

    def run():
        H = H0.clone()
        return H, accumulate_hessian(H, 1000, x)

    (Hk, nk), (Hr, nr) = run_both(monkeypatch, run)
    assert nk == nr == 1150
    assert rel(Hk, Hr) < 2e-6, f"seed {seed}"


# ---- inverse-Hessian factor -----------------------------------------------------------------------

@pytest.mark.parametrize("cols,dead", [(64, ()), (200, (3, 150)), (515, (0, 514))])
def test_inverse_factor_matches_reference(monkeypatch, cols, dead):
    seed = fresh_seed()
    H = random_hessian(cols, dead=dead)
    (fk, fr) = run_both(monkeypatch, lambda: inverse_hessian_factor(H, 0.01))
    assert torch.equal(fk.dead, fr.dead) and int(fk.dead.sum()) == len(dead)
    assert fk.attempts == fr.attempts == 1 and fk.damp_fraction == fr.damp_fraction
    assert torch.equal(torch.triu(fk.U), fk.U) and bool((torch.diag(fk.U) > 0).all())
    # Both against float64 truth: the kernel must be at least about as accurate.
    Hd = H.double().clone()
    idx = torch.tensor(dead, dtype=torch.long, device=DEV)
    Hd[idx, idx] = 1.0
    Hd += 0.01 * torch.mean(torch.diag(Hd)) * torch.eye(cols, device=DEV, dtype=torch.float64)
    truth = torch.linalg.cholesky(torch.linalg.inv(Hd), upper=True)
    err_k, err_r = rel(fk.U, truth), rel(fr.U, truth)
    assert err_k < 1e-4 and err_k < 3 * err_r + 1e-6, f"seed {seed}: kernel {err_k:.3g}, reference {err_r:.3g}"
    assert rel(fk.U, fr.U) < 1e-4, f"seed {seed}"


def test_inverse_factor_escalates_dampening_like_reference(monkeypatch):
    seed = fresh_seed()
    cols = 48
    Q, _ = torch.linalg.qr(torch.randn(cols, cols, device=DEV, dtype=torch.float64))
    eig = torch.ones(cols, device=DEV, dtype=torch.float64)
    eig[0] = -0.3  # fails with damping 0.01 and 0.1 of mean(diag) ~ 0.97, passes with 1.0
    H = ((Q * eig) @ Q.t()).float()
    fk, fr = run_both(monkeypatch, lambda: inverse_hessian_factor(H, 0.01, 4))
    assert fk.attempts == fr.attempts == 3, f"seed {seed}"
    assert fk.damp_fraction == pytest.approx(fr.damp_fraction) == pytest.approx(1.0)
    assert rel(fk.U, fr.U) < 1e-4
    with pytest.raises(CholeskyError):
        inverse_hessian_factor(H, 0.01, 2)


# ---- OBS sweep ------------------------------------------------------------------------------------

def sweep_case(monkeypatch, rows, cols, dtype, blocksize=128, **kwargs):
    seed = fresh_seed()
    W = torch.randn(rows, cols, device=DEV).to(dtype)
    U = reference_factor(random_hessian(cols))
    got, want = run_both(monkeypatch, lambda: obs_sweep(W, U, blocksize=blocksize, **kwargs))
    tag = f"seed {seed}, {rows}x{cols} {dtype} block {blocksize} {kwargs}"
    assert torch.equal(got.pruned, want.pruned), f"{tag}: masks differ in {int((got.pruned != want.pruned).sum())}"
    assert int(got.pruned.sum()) == int(want.pruned.sum())
    assert bool((got.weight[got.pruned] == 0).all())
    assert rel(got.weight, want.weight) < 1e-4, f"{tag}: weights {rel(got.weight, want.weight):.3g}"
    assert got.loss == pytest.approx(want.loss, rel=1e-5), tag
    if want.scales is not None:
        assert rel(got.scales, want.scales) < 1e-6, tag
    return got, want


SHAPES = [(96, 256), (130, 200), (33, 384)]  # widths 200 and 384 end in a partial block of 72 / 128


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows,cols", SHAPES)
def test_obs_sweep_unstructured(monkeypatch, rows, cols, dtype):
    sweep_case(monkeypatch, rows, cols, dtype, sparsity=0.5)


@pytest.mark.parametrize("nm", [(2, 4), (4, 8), (1, 4)])
@pytest.mark.parametrize("rows,cols", SHAPES)
def test_obs_sweep_nm(monkeypatch, rows, cols, nm):
    got, _ = sweep_case(monkeypatch, rows, cols, torch.float16, nm=nm)
    per_group = got.pruned.reshape(rows, cols // nm[1], nm[1]).sum(dim=2)
    assert bool((per_group == nm[1] - nm[0]).all())


@pytest.mark.parametrize(
    "cols,groupsize,blocksize",
    [(256, 64, 128), (256, 128, 128), (512, 256, 128), (200, 200, 128), (384, 128, 64), (256, 32, 32)],
)
@pytest.mark.parametrize("pattern", [{}, {"sparsity": 0.5}, {"nm": (2, 4)}])
@pytest.mark.parametrize("scale_fit", ["minmax", "signed"])
def test_obs_sweep_int4(monkeypatch, cols, groupsize, blocksize, pattern, scale_fit):
    got, _ = sweep_case(monkeypatch, 70, cols, torch.bfloat16, blocksize=blocksize,
                        quant=QuantSpec(groupsize=groupsize, scale_fit=scale_fit), **pattern)
    # every kept weight on the INT4 grid (-1: one group per row)
    int4_grid.encode(got.weight, got.scales, -1 if groupsize == cols else groupsize)


def test_obs_sweep_fixed_mask_with_spanning_group(monkeypatch):
    rows, cols = 50, 512
    mask = torch.rand(rows, cols, device=DEV) < 0.6
    sweep_case(monkeypatch, rows, cols, torch.float32, pruned=mask, quant=QuantSpec(groupsize=256))


def test_obs_sweep_int4_static_scales_act_order(monkeypatch):
    rows, cols, g = 40, 256, 64
    perm = torch.randperm(cols, device=DEV)
    scales = int4_grid.fit_group_scales(torch.randn(rows, cols, device=DEV), g)
    quant = QuantSpec(groupsize=g, static_scales=scales, group_of_column=perm // g)
    sweep_case(monkeypatch, rows, cols, torch.float32, sparsity=0.3, quant=quant)


def test_obs_sweep_large_block_falls_back(monkeypatch):
    # Blocks wider than the kernel's 128 columns take the reference; the result is the same.
    sweep_case(monkeypatch, 20, 512, torch.float32, blocksize=256, sparsity=0.5)


def test_sparsegpt_solver_with_kernels(monkeypatch):
    from pyprune.solvers import sparsegpt
    from pyprune.solvers.base import LayerStats
    from pyprune.solvers.pattern import SparsityPattern

    # The kernel path factors H by another (more accurate) algorithm, so U differs in the last
    # bits and a nearly tied N:M choice may go the other way: compare outcomes, not bits.
    seed = fresh_seed()
    W = torch.randn(64, 256, device=DEV, dtype=torch.bfloat16)
    stats = LayerStats(H=random_hessian(256, dead=(7,)), nsamples=1024)
    got, want = run_both(monkeypatch, lambda: sparsegpt.solve(W, stats, SparsityPattern(n=2, m=4)))
    assert int(got.pruned.sum()) == int(want.pruned.sum()) == 64 * 128
    assert float((got.pruned == want.pruned).float().mean()) > 0.99, f"seed {seed}"
    assert bool((got.weight[:, 7] == 0).all())  # dead input
    assert got.loss == pytest.approx(want.loss, rel=1e-2), f"seed {seed}"


# ---- ADMM step ------------------------------------------------------------------------------------

def admm_case(rows, cols, **selection):
    seed = fresh_seed()
    W = torch.randn(rows, cols, device=DEV)
    U = 0.3 * torch.randn(rows, cols, device=DEV)
    fixed = selection.get("pruned")
    got = admm_step(W, U.clone(), 1.5, **selection)
    ref_sel = dict(selection)
    mode, k, n, m = _admm_mode(ref_sel, cols)
    want = admm_step_reference(W, U.clone(), 1.5, mode, k, n, m, fixed)
    tag = f"seed {seed}, {rows}x{cols} {selection.keys()}"
    assert torch.equal(got.pruned, want.pruned), f"{tag}: masks differ in {int((got.pruned != want.pruned).sum())}"
    for name in ("Z", "U", "rhs"):
        assert torch.equal(getattr(got, name), getattr(want, name)), f"{tag}: {name} differs"
    return got


def _admm_mode(sel, cols):
    if "pruned" in sel:
        return 3, 0, 0, 0
    if "nm" in sel:
        return 2, 0, sel["nm"][0], sel["nm"][1]
    return (1 if sel.get("per_row") else 0), sel["k"], 0, 0


@pytest.mark.parametrize("rows,cols", [(64, 256), (130, 200), (7, 5000)])
@pytest.mark.parametrize("fraction", [0.0, 0.37, 0.8, 1.0])
def test_admm_layer_and_row(rows, cols, fraction):
    k_layer = int(round(fraction * rows * cols))
    got = admm_case(rows, cols, k=k_layer)
    assert int(got.pruned.sum()) == k_layer
    k_row = int(round(fraction * cols))
    got = admm_case(rows, cols, k=k_row, per_row=True)
    assert bool((got.pruned.sum(dim=1) == k_row).all())


@pytest.mark.parametrize("nm", [(2, 4), (4, 8), (1, 4), (3, 16)])
def test_admm_nm(nm):
    got = admm_case(33, 256, nm=nm)
    assert bool((got.pruned.reshape(33, -1, nm[1]).sum(dim=2) == nm[1] - nm[0]).all())


def test_admm_fixed_mask():
    mask = torch.rand(50, 300, device=DEV) < 0.5
    got = admm_case(50, 300, pruned=mask)
    assert torch.equal(got.pruned, mask)


def test_admm_ties_keep_exact_counts():
    # Values on a coarse grid: many |W + U| tie at the threshold; the count must still be exact
    # and every pruned score must be <= every kept score.
    W = torch.randint(-4, 5, (40, 512), device=DEV).float()
    U = torch.zeros_like(W)
    for sel, count in (({"k": 9000}, None), ({"k": 200, "per_row": True}, 200)):
        out = admm_step(W, U.clone(), 1.0, **sel)
        score = W.abs()
        if count is None:
            assert int(out.pruned.sum()) == 9000
            assert float(score[out.pruned].max()) <= float(score[~out.pruned].min())
        else:
            assert bool((out.pruned.sum(dim=1) == count).all())
            hi = torch.where(out.pruned, score, torch.full_like(score, -1.0)).amax(dim=1)
            lo = torch.where(out.pruned, torch.full_like(score, 1e9), score).amin(dim=1)
            assert bool((hi <= lo).all())
