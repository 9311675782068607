"""Packed layouts: exact round trips, documented bit layout, and refusal of bad input."""
import pytest
import torch

from pyprune.formats import (
    PatternError, canonical_format, pack_int4, pack_sparse24, pack_sparse24_int4, quantize_int4,
    quantize_sparse24_int4, rtn_codes,
)
from pyprune.formats.int4 import codes_on_grid
from pyprune.formats.nibbles import pack_nibbles, unpack_nibbles
from pyprune.ops import int4_grid


def prune_2of4(w: torch.Tensor) -> torch.Tensor:
    """Magnitude 2:4: zero the 2 smallest of every group of 4 along the input dimension."""
    n, k = w.shape
    groups = w.reshape(n, k // 4, 4)
    drop = groups.abs().argsort(dim=-1)[..., :2]
    return groups.scatter(2, drop, 0.0).reshape(n, k)


def test_nibbles_round_trip_and_bit_layout():
    fields = torch.randint(0, 16, (5, 64))
    words = pack_nibbles(fields)
    assert words.dtype == torch.int32 and words.shape == (5, 8)
    assert torch.equal(unpack_nibbles(words), fields)
    # Element 8j+i sits in bits 4i..4i+3 of word j; field 7 >= 8 makes the int32 negative.
    one = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 15]])
    assert int(pack_nibbles(one)[0, 0]) == 0xF7654321 - 2**32
    with pytest.raises(ValueError, match="0..15"):
        pack_nibbles(torch.full((1, 8), 16))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(7, 32), (40, 96), (3, 256)])
def test_sparse24_round_trip_exact(dtype, shape):
    w = prune_2of4(torch.randn(shape)).to(dtype)
    w[0, 4:8] = 0  # a fully pruned group
    w[-1, 8:12] = torch.tensor([0.0, 0.0, 0.0, 1.5]).to(dtype)  # a group with a single nonzero
    p = pack_sparse24(w, dtype=dtype)
    n, k = shape
    assert p.values.shape == (n, k // 2) and p.values.dtype == dtype
    assert p.meta.shape == (k // 32, n) and p.meta.dtype == torch.int32
    assert torch.equal(p.unpack(), w)
    assert p.bits_per_weight == pytest.approx(8 * dtype.itemsize / 2 + 1)  # 9 for fp16


def test_sparse24_metadata_layout():
    w = torch.zeros(1, 32, dtype=torch.float16)
    w[0, 1], w[0, 3] = 1.0, 2.0  # group 0 keeps positions 1, 3
    w[0, 28], w[0, 30] = 3.0, 4.0  # group 7 keeps positions 0, 2
    p = pack_sparse24(w)
    field = lambda g: (int(p.meta[0, 0]) >> (4 * g)) & 0xF  # noqa: E731
    assert field(0) == 1 | (3 << 2)
    assert field(7) == 0 | (2 << 2)
    assert p.values[0, :2].tolist() == [1.0, 2.0] and p.values[0, 14:].tolist() == [3.0, 4.0]


def test_sparse24_refuses_dense_weight_naming_the_group():
    w = prune_2of4(torch.randn(6, 64)).half()
    w[4, 13] = 0.5  # group 3 of row 4 (columns 12..15) now holds 3 nonzeros
    if int((w[4, 12:16] != 0).sum()) < 3:
        w[4, 12:16] = torch.tensor([1.0, 2.0, 3.0, 0.0])
    with pytest.raises(PatternError, match=r"row 4, columns 12\.\.15 hold 3 nonzeros"):
        pack_sparse24(w)


def test_width_must_be_multiple_of_32():
    with pytest.raises(ValueError, match="multiple of 32"):
        pack_sparse24(torch.zeros(4, 48))
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_int4(torch.randn(4, 48), groupsize=-1)


@pytest.mark.parametrize("groupsize", [32, 64, 128, -1])
def test_int4_round_trip_exact(groupsize):
    n, k = 24, 256
    w = torch.randn(n, k)
    codes, scales = rtn_codes(w, groupsize)
    codes[0, :8] = torch.tensor([-8, -7, -1, 0, 1, 6, 7, -8], dtype=torch.int8)  # full range
    scales[1::3] = -scales[1::3]  # signed scale fits give negative scales
    p = pack_int4(codes, scales, groupsize)
    g = k if groupsize == -1 else groupsize
    assert p.qweight.shape == (n, k // 8) and p.qweight.dtype == torch.int32
    assert p.scales.shape == (k // g, n) and p.scales.dtype == torch.float16
    c2, s2 = p.unpack()
    assert torch.equal(c2, codes) and torch.equal(s2, scales)
    # dense() is q * s exactly, i.e. the int4_grid's own dequantization.
    assert torch.equal(p.dense(), int4_grid.dequantize_groups(codes, scales, g))
    assert p.bits_per_weight == pytest.approx(4 + 16 / g)


def test_int4_bit_layout_is_offset_binary():
    codes = torch.tensor([[-8, -1, 0, 7, 1, 2, 3, 4] * 4], dtype=torch.int8)
    p = pack_int4(codes, torch.ones(1, 1), -1)
    word = int(p.qweight[0, 0]) & 0xFFFFFFFF
    assert [(word >> (4 * i)) & 0xF for i in range(8)] == [0, 7, 8, 15, 9, 10, 11, 12]


def test_int4_rtn_matches_int4_grid():
    w = torch.randn(16, 128)
    p = quantize_int4(w, 64)
    groups = w.reshape(-1, 64)
    scale = int4_grid.fit_scale(groups)
    expected = int4_grid.fake_quantize(groups, scale).reshape(16, 128)
    assert torch.equal(p.dense(), expected)


def test_int4_refuses_bad_codes_and_scales():
    codes = torch.zeros(4, 64, dtype=torch.int64)
    scales = torch.ones(4, 2)
    codes[2, 5] = 8
    with pytest.raises(PatternError, match=r"row 2, column 5 holds 8"):
        pack_int4(codes, scales, 32)
    codes[2, 5] = 0
    bad = scales.clone()
    bad[1, 1] = 0.1  # not representable in float16
    with pytest.raises(PatternError, match=r"row 1, group 1"):
        pack_int4(codes, bad, 32)
    bad[1, 1] = 0.0  # a zero scale would erase its group
    with pytest.raises(PatternError, match=r"nonzero.*row 1, group 1 holds 0.0"):
        pack_int4(codes, bad, 32)
    with pytest.raises(ValueError, match="groupsize=48"):
        pack_int4(codes, scales, 48)


def test_codes_on_grid_recovers_quantizer_codes_exactly():
    w = torch.randn(8, 128)
    codes, scales = rtn_codes(w, 32)
    codes[3, 7] = -8  # a code RTN would never produce: a refit of the scale would lose it
    for dtype in (torch.float32, torch.float16):
        dense = int4_grid.dequantize_groups(codes, scales, 32).to(dtype)
        assert torch.equal(codes_on_grid(dense, scales, 32), codes)
    off = int4_grid.dequantize_groups(codes, scales, 32)
    off[5, 70] += 1e-3
    with pytest.raises(PatternError, match=r"row 5, group 2"):
        codes_on_grid(off, scales, 32)


@pytest.mark.parametrize("groupsize", [32, 128])
def test_sparse24_int4_round_trip_exact(groupsize):
    n, k = 20, 256
    w = prune_2of4(torch.randn(n, k))
    p = quantize_sparse24_int4(w, groupsize)
    assert p.qvalues.shape == (n, k // 16) and p.meta.shape == (k // 32, n)
    codes, scales = p.unpack()
    ref_codes, ref_scales = rtn_codes(w, groupsize)
    assert torch.equal(codes, ref_codes) and torch.equal(scales, ref_scales)
    assert not codes[w == 0].any()  # pruned weights stay exactly zero
    scales[::2] = -scales[::2]  # signed scales round-trip too
    p = pack_sparse24_int4(codes, scales, groupsize)
    assert all(torch.equal(a, b) for a, b in zip(p.unpack(), (codes, scales)))
    again = pack_sparse24_int4(codes, scales, groupsize)
    for a, b in zip(again.tensors().values(), p.tensors().values()):
        assert torch.equal(a, b)
    assert p.bits_per_weight == pytest.approx(2 + 1 + 16 / groupsize)


def test_sparse24_int4_refuses_dense_codes():
    codes = torch.randint(-8, 8, (4, 64))
    codes[codes == 0] = 1
    with pytest.raises(PatternError, match=r"codes is not 2:4 sparse: row 0, columns 0\.\.3"):
        pack_sparse24_int4(codes, torch.ones(4, 2), 32)


def test_format_names():
    assert canonical_format("2:4+INT4") == "2:4-int4"
    assert canonical_format(" int4 ") == "int4"
    with pytest.raises(ValueError, match="allowed: 2:4, int4, 2:4-int4"):
        canonical_format("int3")
