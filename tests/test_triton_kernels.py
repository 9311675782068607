"""Triton matmul kernels vs the exact dense reference (TRITON_INTERPRET=1 on CPU, set by
conftest): every format, decode and prefill paths, every variant, fp16 and bf16 activations."""
import importlib
import os
from dataclasses import replace

import pytest
import torch

from pyprune.formats import pack_sparse24, quantize_int4, quantize_sparse24_int4
from pyprune.triton_kernels import (
    KernelConfig, int4_dequantize, int4_matmul, sparse24_int4_dequantize, sparse24_int4_matmul,
    sparse24_matmul, sparse24_to_dense,
)
from pyprune.triton_kernels._common import candidate_configs, check_config, dense_chunk_rows
from pyprune.triton_kernels.int4_matmul import int4_limits
from pyprune.triton_kernels.sparse24_int4_matmul import sparse24_int4_limits, spread_base_last
from pyprune.triton_kernels.sparse24_matmul import LIMITS as SPARSE24_LIMITS

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="kernel tests run under TRITON_INTERPRET=1 (see conftest)"
)
DTYPES = [torch.float16, torch.bfloat16]


def prune_2of4(w):
    n, k = w.shape
    g = w.reshape(n, k // 4, 4)
    return g.scatter(2, g.abs().argsort(-1)[..., :2], 0.0).reshape(n, k)


def packed(fmt, n, k, groupsize, dtype):
    """(dense float32 weight, function (x, bias, config) -> kernel output) on fresh weights."""
    if fmt == "2:4":
        p = pack_sparse24(prune_2of4(torch.randn(n, k)).to(dtype))
        return p.dense(), lambda x, b, c: sparse24_matmul(x, p.values, p.meta, b, config=c)
    if fmt == "int4":
        p = quantize_int4(torch.randn(n, k), groupsize)
        return p.dense(), lambda x, b, c: int4_matmul(x, p.qweight, p.scales, p.groupsize, b, config=c)
    p = quantize_sparse24_int4(prune_2of4(torch.randn(n, k)), groupsize)
    return p.dense(), lambda x, b, c: sparse24_int4_matmul(x, p.qvalues, p.meta, p.scales, p.groupsize, b, config=c)


def check(fmt, m, n, k, groupsize, dtype, config=None, bias=True):
    dense, run = packed(fmt, n, k, groupsize, dtype)
    x = torch.randn(m, k).to(dtype)
    b = torch.randn(n).to(dtype) if bias else None
    y = run(x, b, config)
    assert y.shape == (m, n) and y.dtype == dtype
    ref = x.float() @ dense.t() + (b.float() if bias else 0.0)
    ref = ref.to(dtype).float()  # what an exact kernel returns in this dtype
    err = float((y.float() - ref).norm() / ref.norm())
    assert err < 1e-3, f"{fmt} m={m} {dtype} {config}: relative error {err:.2e}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 16, 33])
@pytest.mark.parametrize("fmt", ["2:4", "int4", "2:4-int4"])
def test_default_paths_match_reference(fmt, m, dtype):
    # N = 40 is not a power of two; M <= 16 takes the decode path, 33 the prefill path.
    check(fmt, m, 40, 256, 128, dtype)


VARIANTS = [
    KernelConfig(16, 32, 128, split_k=2, variant="split"),  # decode, packed tile loaded once
    KernelConfig(16, 16, 64, split_k=3, variant="tile"),  # decode with uneven split-K
    KernelConfig(32, 16, 32, group_m=2, variant="tile"),  # prefill, grouped tile order
    KernelConfig(8, 16, 64, split_k=3, variant="gemv"),  # decode on the CUDA cores, uneven split-K
    KernelConfig(16, 32, 64, split_k=3, variant="rows"),  # decode, words unpacked row-wise, uneven split-K
    KernelConfig(32, 16, 128, group_m=2, variant="rows"),  # prefill, a tile past K's end (2:4: K = 384)
    KernelConfig(16, 32, 64, split_k=3, variant="rows", weight_left=True),  # y^T = W x^T, uneven split-K
    KernelConfig(32, 16, 128, group_m=2, variant="rows", weight_left=True),  # y^T = W x^T, prefill
]


@pytest.mark.parametrize("config", VARIANTS, ids=["split", "tile-splitk", "prefill", "gemv", "rows", "rows-prefill",
                                                  "rows-weight-left", "rows-weight-left-prefill"])
@pytest.mark.parametrize("fmt,groupsize", [("2:4", None), ("int4", -1), ("2:4-int4", 64)])
def test_variants_match_reference(fmt, groupsize, config):
    if fmt == "2:4-int4" and config.block_k > 64:
        config = replace(config, block_k=64)  # G = 64 bounds BLOCK_K
    m = {16: 7, 8: 5}.get(config.block_m, 50)
    check(fmt, m, 24, 384, groupsize, torch.float16 if fmt != "int4" else torch.bfloat16, config)


@pytest.mark.parametrize("config", [KernelConfig(128, 128, 64, variant="dense"),
                                    KernelConfig(128, 16, 64, variant="dense_chunks")], ids=["whole", "chunks"])
@pytest.mark.parametrize("fmt,dtype", [("2:4", torch.float16), ("2:4", torch.bfloat16), ("int4", torch.float16),
                                       ("2:4-int4", torch.float16)])
def test_dense_variants_match_reference(fmt, dtype, config):
    # The expand kernel, then cuBLAS (where the tuner offers it: the 2:4 values in the activation
    # dtype, INT4 in fp16): the whole weight at once, or 16 rows at a time (N = 40: two full
    # chunks and a partial one). The bias joins the GEMM's sum: added to the rounded product
    # instead, bf16 is 2.9e-3 off the once-rounded reference.
    check(fmt, 33, 40, 256, 128, dtype, config)


def test_dense_chunks_expand_no_more_than_a_chunk_at_a_time(monkeypatch):
    module = importlib.import_module("pyprune.triton_kernels.sparse24_matmul")
    expanded, expand = [], module._expand

    def recording(out, values, meta):
        expanded.append(tuple(out.shape))
        expand(out, values, meta)
    monkeypatch.setattr(module, "_expand", recording)
    check("2:4", 33, 40, 256, None, torch.float16, KernelConfig(128, 16, 64, variant="dense_chunks"))
    assert expanded == [(16, 256), (16, 256), (8, 256)]


def test_dense_chunks_are_offered_at_prefill_where_they_split_the_weight():
    cpu = torch.device("cpu")
    for m in (300, 2048):
        rows = dense_chunk_rows(m, cpu)
        assert rows % 128 == 0 and rows * -(-m // 128) >= 2 * 8  # two waves of 128 x 128 tiles on 8 "SMs"
        for limits in (int4_limits(128), SPARSE24_LIMITS):
            chunks = [c for c in candidate_configs(m, 4096, 4096, limits, cpu, allow_dense=True)
                      if c.variant == "dense_chunks"]
            assert [c.block_n for c in chunks] == [rows]
            assert not any(c.variant == "dense_chunks"
                           for c in candidate_configs(m, 4096, 4096, limits, cpu, allow_dense=False))
    # Decode, and a weight no taller than one chunk: not offered.
    assert not any(c.variant == "dense_chunks" for c in candidate_configs(16, 4096, 4096, SPARSE24_LIMITS, cpu, True))
    assert not any(c.variant == "dense_chunks"
                   for c in candidate_configs(2048, dense_chunk_rows(2048, cpu), 4096, SPARSE24_LIMITS, cpu, True))


@pytest.mark.parametrize("weight_left", [False, True])
@pytest.mark.parametrize("fmt", ["2:4", "2:4-int4"])
def test_rows_variant_in_bf16(fmt, weight_left):
    # 2:4 values stored in bf16 are reinterpreted from their 32-bit pair words in the kernel.
    check(fmt, 5, 40, 256, 128, torch.bfloat16,
          KernelConfig(16, 16, 128, split_k=2, variant="rows", weight_left=weight_left))


@pytest.mark.parametrize("dtype", DTYPES)
def test_sparse24_int4_prefill_rows_removing_the_code_base_last(dtype):
    # BLOCK_N = 32 num_warps at BLOCK_K = 64 with exact scales (the tiles Triton cannot compile
    # otherwise): the codes are spread with their base, removed from the whole tile after.
    config = KernelConfig(32, 32, 64, num_warps=1, variant="rows")
    assert spread_base_last(config)
    check("2:4-int4", 50, 40, 256, 64, dtype, config)


@pytest.mark.parametrize("config", [KernelConfig(32, 16, 64, group_m=2, variant="rows", fold_scales=True),
                                    KernelConfig(16, 32, 64, split_k=3, variant="rows", fold_scales=True),
                                    KernelConfig(32, 16, 64, group_m=2, variant="rows", fold_scales=True,
                                                 weight_left=True)],
                         ids=["prefill", "decode", "prefill-weight-left"])
@pytest.mark.parametrize("fmt", ["int4", "2:4-int4"])
def test_rows_with_scales_folded_into_the_fp16_tile(fmt, config):
    # The tile holds q * s rounded to fp16 (as the dense path's weight): within 1e-3 of the exact
    # product, and within 2e-4 of x times that rounded weight (the same sum up to its order; the
    # exact product is about 3e-4 away, so the bound also shows that the scales were folded).
    dense, run = packed(fmt, 24, 384, 64, torch.float16)
    x = torch.randn(9, 384).half()
    b = torch.randn(24).half()
    y = run(x, b, config).float()
    exact = (x.float() @ dense.t() + b.float()).half().float()
    rounded = (x.float() @ dense.half().float().t() + b.float()).half().float()
    assert float((y - exact).norm() / exact.norm()) < 1e-3
    assert float((y - rounded).norm() / rounded.norm()) < 2e-4


@pytest.mark.parametrize("cfg", [KernelConfig(16, 16, 64, group_m=2, variant="rows"),
                                 KernelConfig(1, 16, 64, split_k=2, variant="gemv")], ids=["rows", "gemv"])
def test_spread_groups_padded_with_free_positions(cfg):
    # Groups with 0 or 1 nonzeros store zeros at the lowest free positions: every (i0, i1) pair
    # the packer writes, through the row-wise spread of both 2:4 formats and through the
    # 2:4 + INT4 gemv's selects of x's columns.
    w = prune_2of4(torch.randn(24, 256))
    w[:, 0:4] = torch.tensor([0.0, 0.0, 0.0, 0.0])
    w[:, 4:8] = w[:, 4:8] * torch.tensor([0.0, 0.0, 0.0, 1.0])
    w[:, 8:12] = w[:, 8:12] * torch.tensor([1.0, 0.0, 0.0, 0.0])
    w[:, 12:16] = w[:, 12:16] * torch.tensor([0.0, 1.0, 0.0, 0.0])
    x = torch.randn(cfg.block_m if cfg.variant == "gemv" else 9, 256).half()
    if cfg.variant == "rows":
        p = pack_sparse24(w.half())
        ref = (x.float() @ p.dense().t()).half().float()
        y = sparse24_matmul(x, p.values, p.meta, config=cfg).float()
        assert float((y - ref).norm() / ref.norm()) < 1e-3
    q = quantize_sparse24_int4(w, 64)
    ref = (x.float() @ q.dense().t()).half().float()
    y = sparse24_int4_matmul(x, q.qvalues, q.meta, q.scales, 64, config=cfg).float()
    assert float((y - ref).norm() / ref.norm()) < 1e-3


@pytest.mark.parametrize("fmt", ["int4", "2:4-int4"])
def test_gemv_tiles_spanning_several_groups(fmt):
    # BLOCK_K = 128 covers four groups of 32: each word takes its own group's scale.
    check(fmt, 3, 20, 384, 32, torch.bfloat16, KernelConfig(4, 16, 128, split_k=2, variant="gemv"))


@pytest.mark.parametrize("fmt,groupsize", [("2:4", None), ("int4", 64), ("2:4-int4", 64)])
def test_gemv_with_a_full_decode_tile(fmt, groupsize):
    # 13 rows of x in a 16-row tile: each decoded weight serves every row, padded rows masked;
    # K = 384 ends inside the second 256-wide tile.
    check(fmt, 13, 24, 384, groupsize, torch.float16, KernelConfig(16, 8, 256, split_k=2, variant="gemv"))
    check(fmt, 1, 24, 384, groupsize, torch.bfloat16, KernelConfig(1, 8, 256, split_k=1, variant="gemv"))


@pytest.mark.parametrize("fmt,groupsize", [("int4", 128), ("int4", -1), ("2:4-int4", 128)])
def test_gemv_with_wide_row_tiles(fmt, groupsize):
    # The tuner's INT4 gemv tiles: 64 rows (N = 40 leaves 24 masked), BLOCK_K = 256 read in
    # group-sized sub-tiles (G = 128: two, each with its own scales; per-channel scales, G = K =
    # 640: 128-column sub-tiles of one group), K = 640 ending inside the third tile, uneven split.
    check(fmt, 1, 40, 640, groupsize, torch.float16, KernelConfig(1, 64, 256, split_k=2, variant="gemv"))
    check(fmt, 2, 40, 640, groupsize, torch.bfloat16, KernelConfig(2, 64, 256, split_k=1, variant="gemv"))


@pytest.mark.parametrize("m", [5, 8, 16])
def test_tuner_offers_gemv_up_to_the_decode_bound(m):
    cands = candidate_configs(m, 4096, 4096, SPARSE24_LIMITS, torch.device("cpu"), allow_dense=False)
    gemv = [c for c in cands if c.variant == "gemv"]
    assert gemv and all(c.block_k <= 512 and c.block_m >= m for c in gemv)
    for c in gemv:
        check_config(c, SPARSE24_LIMITS, m)


@pytest.mark.parametrize("m", [1, 2, 4, 16])
@pytest.mark.parametrize("limits", [int4_limits(128), sparse24_int4_limits(128)], ids=["int4", "2:4-int4"])
def test_tuner_offers_the_int4_gemv_with_wide_row_tiles_up_to_two_rows(limits, m):
    # Above M = 2 the tensor-core kernels decode INT4 codes in fewer instructions per weight.
    cands = candidate_configs(m, 4096, 4096, limits, torch.device("cpu"), allow_dense=False)
    gemv = [c for c in cands[1:] if c.variant == "gemv"]  # cands[0]: the interpreter's small default
    if m > 2:
        assert not gemv
    else:
        assert gemv and all(c.block_n >= 64 and c.block_k <= 512 for c in gemv)


def test_tuner_offers_folded_scales_only_where_allowed():
    cpu = torch.device("cpu")
    int4 = candidate_configs(2048, 4096, 4096, int4_limits(128), cpu, allow_dense=True)
    folded = [c for c in int4 if c.fold_scales]
    assert folded and all(c.variant == "rows" for c in folded)
    assert any(c.block_m == 256 for c in int4)  # the wide prefill tiles
    for c in int4:
        check_config(c, int4_limits(128), 2048)
    # bf16 activations (no dense fallback either) and 2:4 (no scales): nothing folded.
    assert not any(c.fold_scales for c in candidate_configs(2048, 4096, 4096, int4_limits(128), cpu, allow_dense=False))
    assert not any(c.fold_scales for c in candidate_configs(2048, 4096, 4096, SPARSE24_LIMITS, cpu, allow_dense=True))


@pytest.mark.parametrize("m", [16, 2048])
def test_tuner_offers_the_weight_as_left_operand(m):
    # fp16 INT4: beside every folded prefill tile (where the dot accumulates across K tiles);
    # bf16 INT4 and 2:4: beside every rows tile. Decode: the 64- and 128-row tiles.
    cpu = torch.device("cpu")
    for limits, allow_dense in ((int4_limits(128), True), (int4_limits(128), False), (SPARSE24_LIMITS, True)):
        cands = candidate_configs(m, 4096, 4096, limits, cpu, allow_dense)
        left = [c for c in cands if c.weight_left]
        assert left and all(c.variant == "rows" for c in left)
        for c in left:
            check_config(c, limits, m)
            assert replace(c, weight_left=False) in cands
            if m == 2048 and limits.scaled:
                assert c.fold_scales == allow_dense
            if m == 16:
                assert c.block_n >= 64



SPLIT_K_CONFIGS = [KernelConfig(16, 32, 128, split_k=2, variant="split"),
                   KernelConfig(16, 16, 64, split_k=3, variant="tile"),
                   KernelConfig(8, 16, 64, split_k=3, variant="gemv"),
                   KernelConfig(16, 16, 64, split_k=3, variant="rows"),
                   KernelConfig(16, 16, 64, split_k=3, variant="rows", weight_left=True)]


@pytest.mark.parametrize("config", SPLIT_K_CONFIGS, ids=["split", "tile", "gemv", "rows", "rows-weight-left"])
@pytest.mark.parametrize("fmt", ["2:4", "int4", "2:4-int4"])
def test_split_k_summed_in_the_kernel_as_by_the_reduction_launch(fmt, config, monkeypatch):
    # The same partials summed in the same order: bit for bit the result of the reduction launch,
    # which does not run; every tile's counter is back to zero after each call (N = 40: two full
    # tiles of 16 rows and a partial one).
    common = importlib.import_module("pyprune.triton_kernels._common")
    counters = importlib.import_module("pyprune.triton_kernels.tile_counters")
    launches, reduce = [], common._reduce

    def recording(*args):
        launches.append(args[-1])
        reduce(*args)
    monkeypatch.setattr(common, "_reduce", recording)
    n, k, g = 40, 384, 128
    w = prune_2of4(torch.randn(n, k))
    if fmt == "2:4":
        p = pack_sparse24(w.half())
        weight, run = p.values, lambda x, b, c: sparse24_matmul(x, p.values, p.meta, b, config=c)
    elif fmt == "int4":
        p = quantize_int4(w, g)
        weight, run = p.qweight, lambda x, b, c: int4_matmul(x, p.qweight, p.scales, g, b, config=c)
    else:
        p = quantize_sparse24_int4(w, g)
        weight, run = p.qvalues, lambda x, b, c: sparse24_int4_matmul(x, p.qvalues, p.meta, p.scales, g, b, config=c)
    for dtype in DTYPES:
        x, b = torch.randn(5, k).to(dtype), torch.randn(n).to(dtype)
        by_launch = run(x, b, config)
        assert launches == [config]
        for _ in range(2):  # the second call finds the counters zeroed by the first
            assert torch.equal(run(x, b, replace(config, reduce_in_kernel=True)), by_launch)
            assert launches == [config]
            assert not counters._COUNTERS[id(weight)][1].any()
        launches.clear()


def test_tile_counters_belong_to_their_weight():
    counters = importlib.import_module("pyprune.triton_kernels.tile_counters")
    a, b = torch.zeros(8, 4, dtype=torch.int32), torch.zeros(8, 4, dtype=torch.int32)
    done = counters.for_weight(a, 8, 3)
    assert done.shape == (8,) and done.dtype == torch.int32 and not done.any()
    assert counters.for_weight(a, 8, 8) is done  # one buffer per weight, whatever the launch
    assert counters.for_weight(b, 8, 1) is not done
    assert counters.for_weight(a, 8, 9) is None  # more tiles than counters: the reduction launch
    key = id(a)
    del a
    assert key not in counters._COUNTERS  # gone with its weight


def test_tuner_times_the_fastest_split_tiles_summing_in_the_kernel(monkeypatch):
    # Timings are faked: the tuner's logic, not the GPU, is under test. The split tiles are timed
    # 1.0, 1.1, 1.2, ... in candidate order, the others 2.0 or, in the last case, 0.5.
    common = importlib.import_module("pyprune.triton_kernels._common")
    monkeypatch.setattr(common, "interpreting", lambda: False)
    monkeypatch.setattr(common, "_num_sms", lambda device: 132)
    gpu = type("FakeDevice", (), {"type": "cuda"})()
    cands = candidate_configs(16, 4096, 4096, SPARSE24_LIMITS, gpu, allow_dense=False)
    split = [c for c in cands if c.split_k > 1]
    assert len(split) > common.SUMMED_IN_KERNEL_TIMED and any(c.split_k == 1 for c in cands)
    for in_kernel_ms, whole_ms, expected in (
            ({split[1]: 0.9, split[3]: 0.1}, 2.0, replace(split[1], reduce_in_kernel=True)),  # 4th: not timed
            ({}, 2.0, split[0]),  # summing in the kernel slower everywhere
            ({split[0]: 0.9}, 0.5, next(c for c in cands if c.split_k == 1))):
        timed = []

        def fake_time(key, cfg, launch):
            timed.append(cfg)
            if cfg.reduce_in_kernel:
                return in_kernel_ms.get(replace(cfg, reduce_in_kernel=False), 5.0)
            return 1.0 + 0.1 * split.index(cfg) if cfg in split else whole_ms
        monkeypatch.setattr(common, "_time_config", fake_time)
        key = ("fake", whole_ms, tuple(in_kernel_ms.values()))
        assert common.pick_config(key, 16, 4096, 4096, SPARSE24_LIMITS, gpu, None) == expected
        assert timed[len(cands):] == [replace(c, reduce_in_kernel=True) for c in split[:common.SUMMED_IN_KERNEL_TIMED]]
        common._TUNED.pop(key)


def test_dequantize_kernels_are_exact():
    w = prune_2of4(torch.randn(40, 256))
    p = pack_sparse24(w.half())
    assert torch.equal(sparse24_to_dense(p.values, p.meta), p.unpack())
    q = quantize_int4(torch.randn(40, 256), 64)
    assert torch.equal(int4_dequantize(q.qweight, q.scales, 64, torch.float32), q.dense())
    r = quantize_sparse24_int4(w, 32)
    assert torch.equal(sparse24_int4_dequantize(r.qvalues, r.meta, r.scales, 32, torch.float32), r.dense())


@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_kernels_round_once_to_the_output_dtype(dtype):
    # 40 rows and (2:4) K = 96: tiles past both ends; K tiles within one group of 128 columns.
    w = prune_2of4(torch.randn(40, 96))
    p = pack_sparse24(w.to(dtype))
    assert torch.equal(sparse24_to_dense(p.values, p.meta), p.unpack())
    assert torch.equal(sparse24_to_dense(p.values, p.meta, torch.float32), p.unpack().float())
    q = quantize_int4(torch.randn(40, 384), 128)
    assert torch.equal(int4_dequantize(q.qweight, q.scales, 128, dtype), q.dense().to(dtype))
    r = quantize_sparse24_int4(prune_2of4(torch.randn(40, 384)), 128)
    assert torch.equal(sparse24_int4_dequantize(r.qvalues, r.meta, r.scales, 128, dtype), r.dense().to(dtype))


def test_leading_dims_and_empty_input():
    q = quantize_int4(torch.randn(24, 128), 32)
    x = torch.randn(2, 3, 128).half()
    y = int4_matmul(x, q.qweight, q.scales, 32)
    assert y.shape == (2, 3, 24)
    ref = (x.float() @ q.dense().t()).half()
    assert float((y.float() - ref.float()).norm() / ref.float().norm()) < 1e-3
    assert int4_matmul(x[:0], q.qweight, q.scales, 32).shape == (0, 3, 24)


def test_bad_inputs_are_refused():
    q = quantize_int4(torch.randn(24, 128), 32)
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        int4_matmul(torch.randn(2, 128), q.qweight, q.scales, 32)
    with pytest.raises(ValueError, match="x has 64 input features, the weight expects 128"):
        int4_matmul(torch.randn(2, 64).half(), q.qweight, q.scales, 32)
    with pytest.raises(ValueError, match="block_k=64 must be a power of two dividing 32"):
        int4_matmul(torch.randn(2, 128).half(), q.qweight, q.scales, 32, config=KernelConfig(16, 16, 64))
    with pytest.raises(ValueError, match="split variant needs block_k >= 128"):
        int4_matmul(torch.randn(2, 128).half(), q.qweight, q.scales, 32,
                    config=KernelConfig(16, 16, 32, variant="split"))
    with pytest.raises(ValueError, match="rows variant needs block_k >= 64"):
        int4_matmul(torch.randn(2, 128).half(), q.qweight, q.scales, 32,
                    config=KernelConfig(16, 16, 32, variant="rows"))
    q64 = quantize_int4(torch.randn(24, 128), 64)
    with pytest.raises(ValueError, match="fold_scales needs float16 activations, got torch.bfloat16"):
        int4_matmul(torch.randn(2, 128).bfloat16(), q64.qweight, q64.scales, 64,
                    config=KernelConfig(16, 16, 64, variant="rows", fold_scales=True))
    with pytest.raises(ValueError, match="fold_scales needs the rows variant of a format with group scales"):
        int4_matmul(torch.randn(2, 128).half(), q.qweight, q.scales, 32,
                    config=KernelConfig(16, 16, 32, variant="tile", fold_scales=True))
    with pytest.raises(ValueError, match="reduce_in_kernel needs a Triton matmul variant, not 'dense'"):
        int4_matmul(torch.randn(2, 128).half(), q.qweight, q.scales, 32,
                    config=KernelConfig(16, 16, 32, variant="dense", reduce_in_kernel=True))
    with pytest.raises(ValueError, match="weight_left needs the rows variant"):
        int4_matmul(torch.randn(2, 128).half(), q.qweight, q.scales, 32,
                    config=KernelConfig(16, 16, 32, variant="tile", weight_left=True))
    p = pack_sparse24(prune_2of4(torch.randn(24, 128)).half())
    with pytest.raises(ValueError, match="fold_scales needs the rows variant of a format with group scales"):
        sparse24_matmul(torch.randn(2, 128).half(), p.values, p.meta,
                        config=KernelConfig(16, 16, 64, variant="rows", fold_scales=True))
    with pytest.raises(ValueError, match="gemv variant needs block_k a power of two >= 32"):
        int4_matmul(torch.randn(2, 128).half(), q.qweight, q.scales, 32,
                    config=KernelConfig(2, 16, 48, variant="gemv"))
    with pytest.raises(ValueError, match=r"M <= block_m \(got block_k=64, M=3, block_m=2\)"):
        int4_matmul(torch.randn(3, 128).half(), q.qweight, q.scales, 32,
                    config=KernelConfig(2, 16, 64, variant="gemv"))
