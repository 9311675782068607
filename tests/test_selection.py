"""The shared lowest-score selection: exact counts, ties by position, bounded chunks."""
import pytest
import torch

from pyprune.ops import selection
from pyprune.ops.selection import MODE_LAYER, MODE_NM, MODE_ROW, select_lowest


def oracle(score: torch.Tensor, k: int) -> torch.Tensor:
    """The first k entries of a stable sort of the flattened scores (value, then position)."""
    flat = score.float().flatten() + 0.0
    pruned = torch.zeros(flat.shape, dtype=torch.bool)
    pruned[torch.sort(flat, stable=True).indices[:k]] = True
    return pruned.view(score.shape)


def tied_scores(rows=24, cols=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    score = torch.randint(-3, 4, (rows, cols), generator=g).float() * 0.5  # many ties, negatives
    score[0, :5] = torch.tensor([-0.0, 0.0, float("inf"), -float("inf"), 1e-30])
    return score


@pytest.mark.parametrize("chunk", [1 << 20, 37, 1])  # one chunk, ragged chunks, one row per chunk
def test_whole_matrix_matches_a_stable_sort(monkeypatch, chunk):
    monkeypatch.setattr(selection, "CHUNK_ELEMENTS", chunk)
    score = tied_scores()
    for k in (1, 7, 173, 500, score.numel() - 1, score.numel()):
        assert torch.equal(select_lowest(score, MODE_LAYER, k), oracle(score, k)), k


def test_whole_matrix_with_random_floats_and_low_precision_dtypes(monkeypatch):
    monkeypatch.setattr(selection, "CHUNK_ELEMENTS", 1000)
    score = torch.randn(300, 64)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        s = score.to(dtype).abs()  # bf16/fp16 magnitudes: many exact ties
        for k in (1, 9600, 19199):
            assert torch.equal(select_lowest(s, MODE_LAYER, k), oracle(s, k)), (dtype, k)


@pytest.mark.parametrize("chunk", [1 << 20, 50])
def test_per_row_matches_a_stable_sort_of_each_row(monkeypatch, chunk):
    monkeypatch.setattr(selection, "CHUNK_ELEMENTS", chunk)
    score = tied_scores()
    for k in (1, 17, 40):
        expected = torch.stack([oracle(row[None], k)[0] for row in score])
        assert torch.equal(select_lowest(score, MODE_ROW, k), expected)


@pytest.mark.parametrize("n, m", [(2, 4), (4, 8), (1, 4)])
def test_nm_prunes_the_lowest_of_each_group_ties_by_position(monkeypatch, n, m):
    monkeypatch.setattr(selection, "CHUNK_ELEMENTS", 64)
    score = tied_scores()
    groups = score.reshape(-1, m)
    expected = torch.stack([oracle(g[None], m - n)[0] for g in groups]).view(score.shape)
    assert torch.equal(select_lowest(score, MODE_NM, n=n, m=m), expected)


def test_zero_count_prunes_nothing_and_nan_is_refused():
    score = torch.rand(8, 8)
    assert not select_lowest(score, MODE_LAYER, 0).any()
    assert not select_lowest(score, MODE_ROW, 0).any()
    score[3, 4] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        select_lowest(score, MODE_LAYER, 5)
    with pytest.raises(ValueError, match="mode 7"):
        select_lowest(score, 7, 5)
