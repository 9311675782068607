"""CPU-side checks of the CUDA extension ``pyprune._C`` and of the Python code around it.

* Loading: ``load_extension()`` never raises; CI sets ``PYPRUNE_EXPECT_EXTENSION=1`` and then the
  extension must have been built and must import.
* Bindings (when built): argument checks run before the device check, so wrong dtypes/shapes and
  CPU tensors give clear errors here, without a GPU.
* Glue: ``_sweep_block_cuda`` (tail columns, carried scale, scale placement, static scales) is
  exercised on CPU with a PyTorch model of the kernel's documented contract, against the
  reference sweep.
"""
import importlib
import importlib.abc
import os
import sys

import pytest
import torch

import pyprune
from pyprune.ops import _extension, int4_grid
from pyprune.ops.obs_sweep import QuantSpec, obs_sweep

obs_module = importlib.import_module("pyprune.ops.obs_sweep")  # the package re-exports the function

C = _extension.load_extension()
needs_ext = pytest.mark.skipif(C is None, reason="pyprune._C was not built")


@pytest.fixture
def fresh_loader():
    _extension.load_extension.cache_clear()
    yield
    _extension.load_extension.cache_clear()


# ---- loading --------------------------------------------------------------------------------------

def test_extension_expected_by_ci_is_importable():
    if os.environ.get(_extension.EXPECT_EXTENSION_ENV) != "1":
        pytest.skip(f"{_extension.EXPECT_EXTENSION_ENV} is not set")
    assert _extension.load_extension() is not None, f"pyprune._C did not load: {_extension.extension_error()}"
    assert _extension.extension_error() is None


def test_missing_extension_reads_as_absent(monkeypatch, fresh_loader):
    monkeypatch.delattr(pyprune, "_C", raising=False)
    monkeypatch.setitem(sys.modules, "pyprune._C", None)  # makes the import raise ImportError
    assert _extension.load_extension() is None
    assert "pyprune._C" in _extension.extension_error()  # ModuleNotFoundError: ... halted


def test_broken_extension_reads_as_absent(monkeypatch, fresh_loader):
    class Broken(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "pyprune._C":
                raise OSError("libcusolver.so.12: cannot open shared object file")
            return None

    monkeypatch.delattr(pyprune, "_C", raising=False)
    monkeypatch.delitem(sys.modules, "pyprune._C", raising=False)
    monkeypatch.setattr(sys, "meta_path", [Broken()] + sys.meta_path)
    assert _extension.load_extension() is None
    assert "OSError" in _extension.extension_error() and "libcusolver" in _extension.extension_error()


class _FakeCudaTensor:
    is_cuda = True


def test_kernel_for_dispatch(monkeypatch):
    assert _extension.kernel_for(torch.ones(2)) is None  # CPU tensors always take the reference
    monkeypatch.delenv(_extension.FORCE_REFERENCE_ENV, raising=False)
    assert _extension.kernel_for(_FakeCudaTensor()) is _extension.load_extension()
    monkeypatch.setenv(_extension.FORCE_REFERENCE_ENV, "1")
    assert _extension.kernel_for(_FakeCudaTensor()) is None
    monkeypatch.setenv(_extension.FORCE_REFERENCE_ENV, "0")
    assert _extension.kernel_for(_FakeCudaTensor()) is _extension.load_extension()


# ---- bindings: metadata ---------------------------------------------------------------------------

@needs_ext
def test_build_info():
    info = C.build_info()
    assert set(info["kernels"]) == {"accumulate_hessian", "inverse_hessian_factor", "obs_block", "admm_step"}
    archs = info["archs"].split(",")
    # The build's PYPRUNE_CUDA_ARCHS (default "80 90"), when the test sees the same setting.
    wanted = os.environ.get("PYPRUNE_CUDA_ARCHS", "80 90").split()
    assert sorted(archs) == sorted(a + "0" for a in wanted), info
    assert info["obs_max_cols"] == C.OBS_MAX_COLS == 128
    assert info["cuda_runtime"] >= 12000


@needs_ext
def test_error_strings():
    assert C.error_string(0) == "no error"
    assert "unsupported" in C.error_string(3001)
    assert "cuSOLVER" in C.error_string(2000 + 7)
    assert C.error_string(2)  # a CUDA runtime error code: cudaErrorMemoryAllocation
    assert C.error_string(-5) == "unknown error code"


# ---- bindings: argument checks (CPU tensors) ------------------------------------------------------

def f32(*shape):
    return torch.randn(*shape)


def obs_args(rows=8, count=16, **over):
    args = dict(W1=f32(rows, count), U1=torch.triu(f32(count, count)), prune1=torch.zeros(rows, count, dtype=torch.bool),
                n=0, m=0, col0=0, groupsize=0)
    args.update(over)
    return args


@needs_ext
@pytest.mark.parametrize(
    "over,error,text",
    [
        ({"W1": torch.randn(8, 16, dtype=torch.float64)}, TypeError, "W1 must be Float"),
        ({"W1": f32(8, 129), "U1": f32(129, 129), "prune1": torch.zeros(8, 129, dtype=torch.bool)}, ValueError,
         "1 to 128 columns"),
        ({"W1": f32(8, 16, 1)}, ValueError, "W1 must be a matrix"),
        ({"U1": f32(16, 15)}, ValueError, "U1 must have shape [16, 16]"),
        ({"prune1": torch.zeros(8, 16, dtype=torch.uint8)}, TypeError, "prune1 must be Bool"),
        ({"prune1": torch.zeros(16, 8, dtype=torch.bool).t()}, ValueError, "prune1 must be contiguous"),
        ({"W1": f32(16, 8).t(), }, ValueError, "unit column stride"),
        ({"n": 2, "m": 6}, ValueError, "m must be 2, 4, 8, 16 or 32"),
        ({"n": 4, "m": 4}, ValueError, "0 < n < m"),
        ({"n": 2, "m": 4, "col0": 2}, ValueError, "aligned to N:M groups"),
        ({"groupsize": -3}, ValueError, "groupsize must be >= 0"),
        ({"groupsize": 32, "col0": 16}, ValueError, "carry_scale is required"),
        ({"groupsize": 32}, ValueError, "tail is required"),
        ({"groupsize": 32, "tail": f32(8, 8)}, ValueError, "tail must be [8, >= 16]"),
        ({"groupsize": 16, "static_scales": f32(8, 2)}, ValueError, "not both"),
        ({"static_scales": f32(8, 2)}, ValueError, "group_index is required"),
        ({"static_scales": f32(8, 2), "group_index": torch.zeros(16, dtype=torch.int64)}, TypeError,
         "group_index must be Int"),
        ({}, ValueError, "must be a CUDA tensor"),
        ({"groupsize": 16, "carry_scale": f32(8)}, ValueError, "must be a CUDA tensor"),
    ],
)
def test_obs_block_argument_checks(over, error, text):
    with pytest.raises(error) as info:
        C.obs_block(**obs_args(**over))
    assert text in str(info.value)


@needs_ext
@pytest.mark.parametrize(
    "H,x,nsamples,error,text",
    [
        (f32(8, 8).double(), f32(3, 8), 0, TypeError, "H must be Float"),
        (f32(8, 6), f32(3, 6), 0, ValueError, "H must be square"),
        (f32(8, 8), torch.ones(3, 8, dtype=torch.int32), 0, TypeError, "float32, float16 or bfloat16"),
        (f32(8, 8), f32(3, 7), 0, ValueError, "x must be [tokens, 8]"),
        (f32(8, 8), f32(2, 3, 8), 0, ValueError, "x must be a matrix"),
        (f32(8, 8), f32(8, 3).t(), 0, ValueError, "x must be contiguous"),
        (f32(8, 8), f32(3, 8).half(), -1, ValueError, "nsamples must be >= 0"),
        (f32(8, 8), f32(3, 8).bfloat16(), 5, ValueError, "must be a CUDA tensor"),
    ],
)
def test_accumulate_hessian_argument_checks(H, x, nsamples, error, text):
    with pytest.raises(error) as info:
        C.accumulate_hessian(H, x, nsamples)
    assert text in str(info.value)


@needs_ext
def test_accumulate_hessian_empty_batch_is_a_no_op():
    H = f32(4, 4)
    before = H.clone()
    assert C.accumulate_hessian(H, torch.empty(0, 4), 12) == 12
    assert torch.equal(H, before)


@needs_ext
@pytest.mark.parametrize(
    "H,damp,attempts,error,text",
    [
        (f32(6, 6).double(), 0.01, 4, TypeError, "H must be Float"),
        (f32(6, 5), 0.01, 4, ValueError, "H must be square"),
        (f32(6, 6), -0.5, 4, ValueError, "damp_fraction must be finite and >= 0"),
        (f32(6, 6), float("nan"), 4, ValueError, "damp_fraction must be finite"),
        (f32(6, 6), 0.01, 100, ValueError, "max_attempts must be in [0, 64]"),
        (f32(6, 6), 0.01, 4, ValueError, "must be a CUDA tensor"),
    ],
)
def test_inverse_hessian_factor_argument_checks(H, damp, attempts, error, text):
    with pytest.raises(error) as info:
        C.inverse_hessian_factor(H, damp, attempts)
    assert text in str(info.value)


def admm_args(rows=6, cols=16, **over):
    args = dict(W=f32(rows, cols), U=f32(rows, cols), rho=1.0, mode=0, k=10, n=0, m=0,
                pruned=torch.zeros(rows, cols, dtype=torch.bool))
    args.update(over)
    return args


@needs_ext
@pytest.mark.parametrize(
    "over,error,text",
    [
        ({"W": f32(6, 16).double()}, TypeError, "W must be Float"),
        ({"U": f32(6, 15)}, ValueError, "U must have shape [6, 16]"),
        ({"pruned": torch.zeros(6, 16, dtype=torch.int8)}, TypeError, "pruned must be Bool"),
        ({"mode": 4}, ValueError, "mode must be 0 (per layer)"),
        ({"k": 97}, ValueError, "k=97 pruned weights is outside [0, 96]"),
        ({"mode": 1, "k": 17}, ValueError, "per row is outside [0, 16]"),
        ({"mode": 2, "n": 2, "m": 3}, ValueError, "must divide the width 16"),
        ({"mode": 2, "n": 3, "m": 2}, ValueError, "need 0 < N < M <= 64"),
        ({"rho": float("inf")}, ValueError, "rho must be finite"),
        ({"U": f32(16, 6).t()}, ValueError, "U must be contiguous"),
        ({}, ValueError, "must be a CUDA tensor"),
    ],
)
def test_admm_step_argument_checks(over, error, text):
    with pytest.raises(error) as info:
        C.admm_step(**admm_args(**over))
    assert text in str(info.value)


# ---- the Python glue of the fused OBS kernel, on CPU ----------------------------------------------

class KernelContract:
    """``obs_block`` as csrc/obs_block.cu specifies it, in PyTorch (same float operations as the
    reference, so the results must be bit-identical). It sees only what the glue hands over: the
    block, the carried scale, the tail columns and the static scales."""

    def __init__(self):
        self.calls = []

    def obs_block(self, W1, U1, prune1, n, m, col0, groupsize, carry_scale=None, tail=None,
                  static_scales=None, group_index=None, signed_scales=False):
        rows, count = W1.shape
        assert count <= 128 and U1.shape == (count, count) and prune1.dtype == torch.bool
        g = groupsize
        self.calls.append({"col0": col0, "carry": carry_scale is not None,
                           "tail": None if tail is None else tail.shape[1], "static": static_scales is not None})
        if g and col0 % g:
            assert carry_scale is not None and carry_scale.shape == (rows,)
        starts = [j for j in range(col0, col0 + count) if g and j % g == 0]
        W = W1.clone()
        diag = torch.diag(U1)
        Q, E = torch.zeros_like(W), torch.zeros_like(W)
        loss = torch.zeros(rows, dtype=torch.float64)
        block_scales = torch.zeros(rows, len(starts))
        scale = carry_scale.clone() if carry_scale is not None else torch.ones(rows)
        for i in range(count):
            j = col0 + i
            if m and j % m == 0:
                score = W[:, i:i + m].pow(2) / diag[i:i + m].reshape(1, -1).pow(2)
                drop = torch.sort(score, dim=1, stable=True).indices[:, : m - n]  # ties: lower column
                prune1[:, i:i + m] |= torch.zeros_like(prune1[:, i:i + m]).scatter_(1, drop, True)
            if g and j % g == 0:
                group = W[:, i:i + g].masked_fill(prune1[:, i:i + g], 0.0)
                beyond = i + g - count
                if beyond > 0:
                    assert tail is not None and tail.shape[1] >= beyond
                    group = torch.cat([group, tail[:, :beyond]], dim=1)
                scale = int4_grid.fit_scale(group, "signed" if signed_scales else "minmax").flatten()
                block_scales[:, starts.index(j)] = scale
            w, p = W[:, i], prune1[:, i]
            q = w.masked_fill(p, 0.0)
            if g or static_scales is not None:
                s = static_scales[:, int(group_index[i])] if static_scales is not None else scale
                q = int4_grid.fake_quantize(q, s).masked_fill(p, 0.0)
            err = (w - q) / diag[i]
            loss += (err.double() ** 2) / 2
            W[:, i:].addr_(err, U1[i, i:], alpha=-1.0)
            Q[:, i], E[:, i] = q, err
        return Q, E, loss, block_scales


def upper_factor(cols):
    X = torch.randn(3 * cols, cols)
    H = 2 * X.t() @ X / X.shape[0] + 0.05 * torch.eye(cols)
    return torch.linalg.cholesky(torch.linalg.inv(H), upper=True)


def sweep_with_contract(monkeypatch, W, U, **kwargs):
    contract = KernelContract()
    monkeypatch.setattr(obs_module, "kernel_for", lambda t: contract)
    got = obs_sweep(W, U, **kwargs)
    monkeypatch.undo()
    want = obs_sweep(W, U, **kwargs)
    assert torch.equal(got.pruned, want.pruned)
    assert torch.equal(got.weight, want.weight)
    assert got.loss == pytest.approx(want.loss, rel=1e-12)
    if want.scales is not None:
        assert torch.equal(got.scales, want.scales)
    return contract.calls


@pytest.mark.parametrize(
    "cols,groupsize,blocksize",
    [(256, 64, 128), (512, 256, 128), (200, 200, 128), (384, 128, 64), (96, 32, 32)],
)
@pytest.mark.parametrize("pattern", [{}, {"sparsity": 0.5}, {"nm": (2, 4)}])
@pytest.mark.parametrize("scale_fit", ["minmax", "signed"])
def test_sweep_glue_quantized(monkeypatch, cols, groupsize, blocksize, pattern, scale_fit):
    W, U = torch.randn(12, cols), upper_factor(cols)
    calls = sweep_with_contract(monkeypatch, W, U, blocksize=blocksize, quant=QuantSpec(groupsize, scale_fit=scale_fit),
                                **pattern)
    assert len(calls) == -(-cols // blocksize)
    for call in calls:
        assert call["carry"] == bool(call["col0"] % groupsize)
        if groupsize > blocksize and call["col0"] % groupsize == 0:
            assert call["tail"] == min(groupsize, cols) - min(blocksize, cols)  # rest of the group


def test_sweep_glue_fixed_mask_and_static_scales(monkeypatch):
    rows, cols, g = 10, 256, 64
    W, U = torch.randn(rows, cols), upper_factor(cols)
    mask = torch.rand(rows, cols) < 0.5
    sweep_with_contract(monkeypatch, W, U, pruned=mask, quant=QuantSpec(256))
    perm = torch.randperm(cols)
    quant = QuantSpec(g, static_scales=int4_grid.fit_group_scales(W, g), group_of_column=perm // g)
    calls = sweep_with_contract(monkeypatch, W, U, sparsity=0.4, quant=quant)
    assert all(call["static"] for call in calls)


def test_sweep_glue_leaves_wide_blocks_and_odd_groups_to_the_reference(monkeypatch):
    W, U = torch.randn(6, 240), upper_factor(240)
    assert sweep_with_contract(monkeypatch, W, U, blocksize=256, sparsity=0.5) == []  # 240 columns > 128
    assert sweep_with_contract(monkeypatch, W, U, blocksize=120, nm=(2, 6)) == []  # M = 6 does not divide 32
    assert len(sweep_with_contract(monkeypatch, W, U, blocksize=120, nm=(1, 8))) == 2
