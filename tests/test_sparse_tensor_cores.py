"""The "cusparselt" variant (2:4 formats on the sparse tensor cores).

cuSPARSELt needs a GPU, so here a CPU stand-in plays the library: it compresses a 2:4 matrix into
the kept values in row order followed by metadata in a layout of its own, and its multiply reads
that buffer back. What is checked is pyprune's side: the metadata derived from a probe of the
weight's pattern, its cache, the assembly of the buffer at each call, padding and bias. The
real library runs in ``selfcheck`` on a GPU (``tests/test_triton_gpu.py``).
"""
import gc
import os

import pytest
import torch

from pyprune.formats import pack_sparse24, quantize_int4, quantize_sparse24_int4
from pyprune.triton_kernels import KernelConfig, int4_matmul, sparse24_int4_matmul, sparse24_matmul
from pyprune.triton_kernels import sparse_tensor_cores
from pyprune.triton_kernels.tensor_keyed import TensorKeyed
from pyprune.triton_kernels._common import candidate_configs
from pyprune.triton_kernels.int4_matmul import int4_limits
from pyprune.triton_kernels.sparse24_int4_matmul import sparse24_int4_limits
from pyprune.triton_kernels.sparse24_matmul import LIMITS as SPARSE24_LIMITS

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="kernel tests run under TRITON_INTERPRET=1 (see conftest)"
)
CUSPARSELT = KernelConfig(128, 128, 64, variant=sparse_tensor_cores.VARIANT)


def prune_2of4(w):
    n, k = w.shape
    g = w.reshape(n, k // 4, 4)
    return g.scatter(2, g.abs().argsort(-1)[..., :2], 0.0).reshape(n, k)


class StandInLibrary:
    """cuSPARSELt's compress and multiply on CPU tensors. Like a library that reads the pattern
    from the values, it keeps each group's first two nonzero positions (free positions when a
    group has fewer nonzeros); the metadata is one 4-bit field (i0 | i1 << 2) per group."""

    def __init__(self, swap_kept=False):
        self.swap_kept = swap_kept  # a library that orders the kept values otherwise
        self.compressions = 0
        self.searches = []  # M of each algorithm search
        self.algorithms = []  # the algorithm of each multiply

    def compress(self, dense):
        self.compressions += 1
        n, k = dense.shape
        groups = dense.reshape(n, k // 4, 4)
        zero_last = torch.sort((groups == 0).to(torch.int8), dim=-1, stable=True).indices
        pos = zero_last[..., :2].sort(-1).values
        kept = groups.gather(-1, pos)
        if self.swap_kept:
            kept = kept.flip(-1)
        fields = (pos[..., 0] | (pos[..., 1] << 2)).reshape(n, k // 8, 2)
        meta = (fields[..., 0] | (fields[..., 1] << 4)).to(torch.uint8)
        return torch.cat([kept.reshape(-1), meta.reshape(-1).view(dense.dtype)])

    def search(self, buffer, x, bias):
        self.searches.append(x.shape[0])
        return 3

    def multiply(self, buffer, x, bias, algorithm):
        assert x.is_contiguous(), "the library reads x with a row stride of K"
        self.algorithms.append(algorithm)
        flat = buffer.reshape(-1)
        k = x.shape[1]
        n = flat.numel() * 16 // 9 // k
        kept = flat[: n * k // 2].view(n, k // 4, 2)
        meta = flat[n * k // 2:].view(torch.uint8).to(torch.int64).reshape(n, k // 8, 1)
        fields = torch.cat([meta & 0xF, meta >> 4], dim=-1).reshape(n, k // 4, 1)
        pos = torch.cat([fields & 3, fields >> 2], dim=-1)
        dense = torch.zeros(n, k // 4, 4, dtype=torch.float32).scatter(-1, pos, kept.float()).reshape(n, k)
        y = x.float() @ dense.t() + (bias.float() if bias is not None else 0.0)
        return y.to(x.dtype)


@pytest.fixture
def library(monkeypatch):
    lib = StandInLibrary()
    monkeypatch.setattr(sparse_tensor_cores, "_compress", lib.compress)
    monkeypatch.setattr(sparse_tensor_cores, "_multiply", lib.multiply)
    monkeypatch.setattr(sparse_tensor_cores, "_search", lib.search)
    monkeypatch.setattr(sparse_tensor_cores, "_ALGORITHMS", {})
    monkeypatch.setattr(sparse_tensor_cores, "_METADATA", TensorKeyed())
    monkeypatch.setattr(sparse_tensor_cores, "unsupported_reason", lambda *args: "")
    return lib


def sparse24_with_zero_kept_values(n, k, dtype):
    """A packed 2:4 weight in which about a quarter of the kept values are 0 at the packer's
    positions: a library reading the pattern from such a weight would place them elsewhere."""
    p = pack_sparse24(prune_2of4(torch.randn(n, k)).to(dtype))
    p.values[torch.rand(p.values.shape) < 0.25] = 0
    return p


def relative_error(y, ref):
    return float((y.float() - ref).norm() / ref.norm())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [29, 64])  # 29 rows are padded to 32
def test_sparse24_on_the_stand_in_library(library, m, dtype):
    p = sparse24_with_zero_kept_values(48, 256, dtype)
    x = torch.randn(m, 256).to(dtype)
    b = torch.randn(48).to(dtype)
    y = sparse24_matmul(x, p.values, p.meta, b, config=CUSPARSELT)
    assert y.shape == (m, 48) and y.dtype == dtype
    ref = (x.float() @ p.dense().t() + b.float()).to(dtype).float()
    assert relative_error(y, ref) < 1e-3


@pytest.mark.parametrize("groupsize", [32, 64, 128])
def test_sparse24_int4_on_the_stand_in_library(library, groupsize):
    p = quantize_sparse24_int4(prune_2of4(torch.randn(32, 384)), groupsize)
    x = torch.randn(37, 384).half()
    y = sparse24_int4_matmul(x, p.qvalues, p.meta, p.scales, groupsize, config=CUSPARSELT)
    ref = (x.float() @ p.dense().t()).half().float()
    assert relative_error(y, ref) < 1e-3


def test_rows_of_a_wider_tensor(library):
    p = pack_sparse24(prune_2of4(torch.randn(32, 128)).half())
    x = torch.randn(64, 384).half()[:, 100:228]  # row stride 384
    y = sparse24_matmul(x, p.values, p.meta, config=CUSPARSELT)
    assert relative_error(y, (x.float() @ p.dense().t()).half().float()) < 1e-3


def test_library_metadata_is_cached_and_follows_in_place_changes(library):
    p = sparse24_with_zero_kept_values(32, 128, torch.float16)
    x = torch.randn(32, 128).half()
    sparse24_matmul(x, p.values, p.meta, config=CUSPARSELT)
    sparse24_matmul(x, p.values, p.meta, config=CUSPARSELT)
    assert library.compressions == 1
    other = pack_sparse24(prune_2of4(torch.randn(32, 128)).half())
    p.values.copy_(other.values)
    p.meta.copy_(other.meta)  # a new pattern in the same tensor: the metadata is derived again
    y = sparse24_matmul(x, p.values, p.meta, config=CUSPARSELT)
    assert library.compressions == 2
    ref = (x.float() @ other.dense().t()).half().float()
    assert relative_error(y, ref) < 1e-3


def test_the_cached_metadata_goes_with_its_tensor(library):
    p = pack_sparse24(prune_2of4(torch.randn(32, 128)).half())
    sparse24_matmul(torch.randn(32, 128).half(), p.values, p.meta, config=CUSPARSELT)
    assert list(sparse_tensor_cores._METADATA) == [id(p.meta)]
    assert not p.meta.__dict__  # nothing that torch.save would write with the tensor
    del p
    gc.collect()
    assert not sparse_tensor_cores._METADATA


def test_the_algorithm_is_searched_once_per_shape_and_bucket_of_m(library):
    p = pack_sparse24(prune_2of4(torch.randn(32, 128)).half())
    for m in (40, 64, 33, 100):  # buckets 64, 64, 64, 128 (after padding to 8 rows: 40, 64, 40, 104)
        sparse24_matmul(torch.randn(m, 128).half(), p.values, p.meta, config=CUSPARSELT)
    assert library.searches == [40, 104]
    assert library.algorithms == [3, 3, 3, 3]


def test_a_failed_search_falls_back_to_the_default_algorithm(library, monkeypatch):
    def no_search(*args):
        raise RuntimeError("no search in this library")

    monkeypatch.setattr(sparse_tensor_cores, "_search", no_search)
    p = pack_sparse24(prune_2of4(torch.randn(32, 128)).half())
    x = torch.randn(40, 128).half()
    y = sparse24_matmul(x, p.values, p.meta, config=CUSPARSELT)
    assert library.algorithms == [0]
    assert relative_error(y, (x.float() @ p.dense().t()).half().float()) < 1e-3


def test_a_library_with_another_value_order_is_refused(library):
    library.swap_kept = True
    p = pack_sparse24(prune_2of4(torch.randn(32, 128)).half())
    with pytest.raises(RuntimeError, match="kept values in row order"):
        sparse24_matmul(torch.randn(32, 128).half(), p.values, p.meta, config=CUSPARSELT)


def test_the_variant_is_refused_where_it_cannot_run():
    p = pack_sparse24(prune_2of4(torch.randn(32, 128)).half())
    with pytest.raises(ValueError, match="cusparselt variant cannot run: cuSPARSELt needs a CUDA device"):
        sparse24_matmul(torch.randn(32, 128).half(), p.values, p.meta, config=CUSPARSELT)
    q = quantize_int4(torch.randn(32, 128), 32)
    with pytest.raises(ValueError, match="cusparselt variant needs a 2:4 format"):
        int4_matmul(torch.randn(32, 128).half(), q.qweight, q.scales, 32, config=CUSPARSELT)


def test_unsupported_shapes_and_dtypes_are_named(monkeypatch):
    monkeypatch.setattr(sparse_tensor_cores, "library_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    reason = sparse_tensor_cores.unsupported_reason
    assert reason(4096, 4096, torch.float16, "cuda") == ""
    assert reason(40, 128, torch.float16, "cuda") == "cuSPARSELt needs N and K multiples of 16, got N=40, K=128"
    assert "float16 or bfloat16 activations, got torch.float32" in reason(4096, 4096, torch.float32, "cuda")
    assert "a CUDA device, got cpu" in reason(4096, 4096, torch.float16, "cpu")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert "compute capability 8.0" in reason(4096, 4096, torch.float16, "cuda")


def test_tuner_offers_the_sparse_tensor_cores_to_the_2of4_formats_at_prefill(monkeypatch):
    monkeypatch.setattr(sparse_tensor_cores, "unsupported_reason", lambda *args: "")
    cpu = torch.device("cpu")

    def offered(limits, m, allow_dense=True):
        variants = {c.variant for c in candidate_configs(m, 4096, 4096, limits, cpu, allow_dense)}
        return sparse_tensor_cores.VARIANT in variants

    for limits in (SPARSE24_LIMITS, sparse24_int4_limits(128)):
        assert offered(limits, 2048)
        assert not offered(limits, 2048, allow_dense=False)  # bf16 activations
        assert not offered(limits, 16)  # decode
    assert not offered(int4_limits(128), 2048)
