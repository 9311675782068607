import os

import pytest
import torch

from pyprune.models import decoder_layers, prunable_linears
from pyprune.pipeline import RunOptions, prune_model
from pyprune.pipeline.activations import (
    ActivationStore, estimate_activation_memory, estimate_for_run, format_estimate,
)
from pyprune.schedule import UniformSchedule
from pyprune.solvers import SparsityPattern
from tests.helpers import Killed, sparsegpt_killed_after, tiny_model


def calib(nsamples=4, seqlen=32, seed=0):
    return torch.randint(0, 128, (nsamples, seqlen), generator=torch.Generator().manual_seed(seed))


def run(model, method="sparsegpt", tokens=None, **options):
    options.setdefault("show_progress", False)
    return prune_model(model, calib() if tokens is None else tokens, method,
                       UniformSchedule(SparsityPattern(sparsity=0.5)), {}, RunOptions(batch_size=2, **options))


def rss_file_kib():
    """File-backed resident memory of this process (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssFile:"):
                return int(line.split()[1])
    raise RuntimeError("no RssFile line")


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_disk_activations_give_the_same_weights_as_cpu(family, tmp_path):
    a, b = tiny_model(family), tiny_model(family)
    tokens = calib(nsamples=5)  # an odd count: the last batch is smaller
    run(a, tokens=tokens, activations="cpu")
    result = run(b, tokens=tokens, activations="disk", activations_dir=str(tmp_path))
    assert result["activations"]["storage"] == "disk"
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
    assert os.listdir(tmp_path) == []  # the activation files are removed after the run


def test_disk_store_round_trip_and_files(tmp_path):
    store = ActivationStore("disk", "cpu", str(tmp_path))
    model = tiny_model("llama")
    tokens = calib(nsamples=6)
    inputs, kwargs = store.capture(model, tokens, batch_size=4)
    reference, ref_kwargs = ActivationStore("cpu", "cpu").capture(model, tokens, batch_size=4)
    assert set(kwargs) == set(ref_kwargs) == {4, 2}
    assert torch.equal(inputs, reference)
    folder = os.path.join(tmp_path, os.listdir(tmp_path)[0])
    files = os.listdir(folder)
    assert len(files) == 1 and os.path.getsize(os.path.join(folder, files[0])) == reference.numel() * 4
    out = store.empty_like(inputs)
    assert out.data_ptr() != inputs.data_ptr()
    values = torch.randn(2, *inputs.shape[1:])
    store.put(out, 3, values)
    assert torch.equal(store.batch(out, 3, 2, "cpu"), values)
    again = store.empty_like(out)  # the next layer reuses the first file
    assert again.data_ptr() == inputs.data_ptr() and len(os.listdir(folder)) == 2
    store.close()
    assert not os.path.exists(folder)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc (Linux)")
def test_disk_pages_leave_the_process_after_each_batch(tmp_path):
    store = ActivationStore("disk", "cpu", str(tmp_path))
    shape = (64, 256, 1024)  # 64 MiB of float32
    big = store._new_mapped(shape, torch.float32)
    before = rss_file_kib()
    for start in range(shape[0]):
        store.put(big, start, torch.randn(1, *shape[1:]))
    grew_with_release = rss_file_kib() - before
    total = 0.0
    for start in range(shape[0]):
        total += float(store.batch(big, start, 1, "cpu").sum())
    grew_after_reads = rss_file_kib() - before
    # Without the release, writing touches all 64 MiB of mapped pages; they would stay resident.
    before_touch = rss_file_kib()
    big.add_(0)
    touched = rss_file_kib() - before_touch
    store.close()
    assert touched > 48 * 1024, "the measurement cannot see mapped pages"
    assert grew_with_release < 8 * 1024 and grew_after_reads < 8 * 1024
    assert total == total  # the reads returned real numbers


def test_resume_with_disk_activations_is_bit_identical(tmp_path):
    reference = tiny_model("llama")
    run(reference, activations="disk", activations_dir=str(tmp_path / "act"))

    model = tiny_model("llama")
    per_layer = len(prunable_linears(decoder_layers(model)[0]))
    with sparsegpt_killed_after(per_layer), pytest.raises(Killed):  # dies in layer 1
        run(model, activations="disk", activations_dir=str(tmp_path / "act"), progress_dir=str(tmp_path / "p"))
    fresh = tiny_model("llama")
    result = run(fresh, activations="disk", activations_dir=str(tmp_path / "act"), progress_dir=str(tmp_path / "p"),
                 resume=True)
    assert result["resumed_from"] == 1
    for (name, a), (_, b) in zip(reference.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), name


def test_estimate_counts_bytes_of_each_choice():
    e = estimate_activation_memory(128, 2048, 4096, torch.float16, batch_size=2, statistics_bytes=123)
    copy = 128 * 2048 * 4096 * 2
    assert e["per_copy_bytes"] == copy
    assert e["device"] == {"device_bytes": 2 * copy, "ram_bytes": 0, "disk_bytes": 0}
    assert e["cpu"]["ram_bytes"] == 2 * copy and e["cpu"]["device_bytes"] == 2 * 2 * 2048 * 4096 * 2
    assert e["disk"]["disk_bytes"] == 2 * copy and e["disk"]["ram_bytes"] == 2 * 2 * 2048 * 4096 * 2
    text = format_estimate(e, "disk", "cuda:0", (128, 2048, 4096), torch.float16)
    assert "2.00 GiB per copy" in text and "4.00 GiB on cuda:0" in text
    assert text.count("--activations") == 3
    assert [line for line in text.splitlines() if "chosen" in line][0].strip().startswith("--activations disk")


def test_estimate_for_a_model_reads_hidden_size_and_hessians():
    model = tiny_model("llama")  # hidden 64, intermediate 128: 6 Linears read 64, down_proj reads 128
    e, shape, dtype = estimate_for_run(model, calib(nsamples=3, seqlen=16), batch_size=1)
    assert shape == (3, 16, 64) and dtype == torch.float32
    assert e["per_copy_bytes"] == 3 * 16 * 64 * 4
    assert e["statistics_bytes"] == 4 * (6 * 64 * 64 + 128 * 128)


def test_printed_estimate_and_reported_choice(capsys):
    result = run(tiny_model("llama"), activations="cpu", show_progress=True)
    err = capsys.readouterr().err
    assert "calibration activations: 4 x 32 x 64 float32" in err
    assert "--activations cpu" in err and "chosen" in err
    assert result["activations"]["storage"] == "cpu"


def test_bad_storage_is_refused_by_name():
    with pytest.raises(ValueError, match="activations='ram'.*device, cpu, disk"):
        RunOptions(activations="ram")
