import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from pyprune.models import decoder_layers, prunable_linears
from pyprune.pipeline import RunOptions, prune_model
from pyprune.pipeline.streaming import INDEX_NAME, CheckpointIndex, prune_streamed, read_header
from pyprune.schedule import UniformSchedule
from pyprune.solvers import SparsityPattern
from tests.helpers import Killed, sparsegpt_killed_after, tiny_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def calib(nsamples=4, seqlen=32, seed=0):
    return torch.randint(0, 128, (nsamples, seqlen), generator=torch.Generator().manual_seed(seed))


def schedule(pattern="0.5"):
    return UniformSchedule(SparsityPattern.parse(pattern))


def options(**kw):
    return RunOptions(batch_size=2, show_progress=False, **kw)


def save_sharded(family, folder, max_shard_size="40KB"):
    model = tiny_model(family)
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:  # stands for the tokenizer files
        json.dump({"model_max_length": 128}, f)
    return str(folder)


def load(folder):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.eval()
    model.config.use_cache = False
    return model


def in_memory_reference(source, method="sparsegpt", pattern="0.5"):
    model = load(source)
    prune_model(model, calib(), method, schedule(pattern), {}, options())
    return model


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
def test_streamed_output_equals_the_in_memory_result_and_reloads(family, tmp_path):
    source = save_sharded(family, tmp_path / "source")
    shards = [f for f in os.listdir(source) if f.endswith(".safetensors")]
    assert len(shards) >= 4  # layers are spread over several shards
    out = tmp_path / "out"
    result = prune_streamed(source, str(out), calib(), "sparsegpt", schedule(), {}, options())
    assert result["complete"] and result["streamed"]
    reference = in_memory_reference(source)
    reloaded = load(str(out))
    assert_same_state(reference, reloaded)
    tokens = calib(seed=5)
    assert torch.equal(reference(tokens).logits, reloaded(tokens).logits)
    assert len(result["records"]) == sum(len(prunable_linears(l)) for l in decoder_layers(reference))
    # the same tensors under the same names, an index that lists them all, the other files copied
    with open(os.path.join(source, INDEX_NAME)) as f:
        source_keys = set(json.load(f)["weight_map"])
    with open(out / INDEX_NAME) as f:
        index = json.load(f)
    assert set(index["weight_map"]) == source_keys
    assert index["metadata"]["total_size"] == sum(
        CheckpointIndex(source).nbytes(k) for k in source_keys)
    for name in ("config.json", "generation_config.json", "tokenizer_config.json"):
        if os.path.exists(os.path.join(source, name)):
            assert (out / name).read_bytes() == open(os.path.join(source, name), "rb").read()


def test_each_decoder_layer_is_written_to_its_own_shard(tmp_path):
    source = save_sharded("llama", tmp_path / "source")
    out = tmp_path / "out"
    prune_streamed(source, str(out), calib(), "wanda", schedule("2:4"), {}, options())
    with open(out / INDEX_NAME) as f:
        weight_map = json.load(f)["weight_map"]
    for i in range(2):
        files = {v for k, v in weight_map.items() if k.startswith(f"model.layers.{i}.")}
        assert len(files) == 1
        header, _ = read_header(str(out / files.pop()))
        assert all(k.startswith(f"model.layers.{i}.") for k in header if k != "__metadata__")


def test_a_killed_streamed_run_resumes_from_the_last_written_layer(tmp_path):
    source = save_sharded("llama", tmp_path / "source")
    reference = in_memory_reference(source)
    per_layer = len(prunable_linears(decoder_layers(reference)[0]))
    out, progress = tmp_path / "out", str(tmp_path / "progress")
    with sparsegpt_killed_after(per_layer), pytest.raises(Killed):  # dies in layer 1
        prune_streamed(source, str(out), calib(), "sparsegpt", schedule(), {}, options(progress_dir=progress))
    assert not (out / INDEX_NAME).exists()  # an incomplete output is not a checkpoint
    result = prune_streamed(source, str(out), calib(), "sparsegpt", schedule(), {},
                            options(progress_dir=progress, resume=True))
    assert result["resumed_from"] == 1 and len(result["records"]) == 2 * per_layer
    assert_same_state(reference, load(str(out)))


def test_max_layers_pauses_and_a_resumed_call_finishes(tmp_path):
    source = save_sharded("opt", tmp_path / "source")
    out, progress = tmp_path / "out", str(tmp_path / "progress")
    first = prune_streamed(source, str(out), calib(), "sparsegpt", schedule(), {}, options(progress_dir=progress),
                           max_layers=1)
    assert first == {**first, "complete": False, "next_layer": 1}
    assert not (out / INDEX_NAME).exists()
    second = prune_streamed(source, str(out), calib(), "sparsegpt", schedule(), {},
                            options(progress_dir=progress, resume=True), max_layers=1)
    assert second["complete"] and second["resumed_from"] == 1
    assert_same_state(in_memory_reference(source), load(str(out)))


def test_resume_without_the_written_shards_is_refused(tmp_path):
    source = save_sharded("llama", tmp_path / "source")
    out, progress = tmp_path / "out", str(tmp_path / "progress")
    prune_streamed(source, str(out), calib(), "sparsegpt", schedule(), {}, options(progress_dir=progress), max_layers=1)
    for name in os.listdir(out):
        os.remove(out / name)
    with pytest.raises(FileNotFoundError, match="lacks the shards of layers \\[0\\]"):
        prune_streamed(source, str(out), calib(), "sparsegpt", schedule(), {},
                       options(progress_dir=progress, resume=True))


def test_save_dtype_and_disk_activations(tmp_path):
    source = save_sharded("llama", tmp_path / "source")
    out = tmp_path / "out"
    prune_streamed(source, str(out), calib(), "sparsegpt", schedule(), {},
                   options(activations="disk", activations_dir=str(tmp_path / "act")), save_dtype=torch.float16)
    with open(out / "config.json") as f:
        assert json.load(f)["dtype"] == "float16"
    index = CheckpointIndex(str(out))
    assert {e.dtype for e in index.entries.values()} == {torch.float16}
    reference = in_memory_reference(source)
    reloaded = load(str(out))
    for name, W in reference.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], W.half().float()), name


def test_single_file_checkpoint_and_statistics_free_method(tmp_path):
    source = save_sharded("llama", tmp_path / "source", max_shard_size="10GB")
    assert os.path.exists(os.path.join(source, "model.safetensors"))
    out = tmp_path / "out"
    result = prune_streamed(source, str(out), None, "magnitude", schedule("0.3"), {}, options())
    assert "activations" not in result  # no calibration pass at all
    reference = load(source)
    prune_model(reference, None, "magnitude", schedule("0.3"), {}, options())
    assert_same_state(reference, load(str(out)))


def test_bad_folders_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a folder holding a safetensors checkpoint"):
        prune_streamed(str(tmp_path), str(tmp_path / "out"), calib(), "wanda", schedule(), {}, options())
    source = save_sharded("llama", tmp_path / "source")
    with pytest.raises(ValueError, match="is the source folder"):
        prune_streamed(source, source, calib(), "wanda", schedule(), {}, options())


# One process: a warm-up run on a 2-layer model first (every code path's one-time cost: lazy
# imports, kernel set-up), then the high-water mark of the resident set (VmHWM, reset through
# /proc/self/clear_refs) is measured around the streamed run, and around an in-memory load.
def test_row_reads_block_copies_and_embedding_rows(tmp_path):
    from pyprune.pipeline.streaming import LayerStreamer, StoredTensor, load_skeleton

    source = save_sharded("llama", tmp_path / "source")
    index = CheckpointIndex(source)
    full = index.read("model.embed_tokens.weight")
    assert torch.equal(index.read_rows("model.embed_tokens.weight", 5, 17), full[5:17])
    blocks = list(StoredTensor(index, "model.embed_tokens.weight", block_bytes=3000).blocks())
    assert len(blocks) > 3 and torch.equal(torch.cat(blocks), full)
    streamer = LayerStreamer(load_skeleton(source), source, str(tmp_path / "out"))
    tokens = torch.tensor([[3, 4, 5, 90], [5, 127, 0, 4]])
    with streamer.capturing(tokens):
        weight = streamer.model.model.embed_tokens.weight
        ids = tokens.unique()
        assert torch.equal(weight[ids], full[ids])
        assert streamer.model.lm_head.__class__.__name__ == "Identity"
    assert streamer.model.model.embed_tokens.weight.device.type == "meta"  # released after the capture
    with pytest.raises(ValueError, match="outside the vocabulary"):
        with streamer.capturing(torch.tensor([[1, 128]])):
            pass


MEASURE = textwrap.dedent("""
    import json, re, sys
    import torch
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM
    from pyprune.pipeline import RunOptions
    from pyprune.pipeline.streaming import prune_streamed, trim_heap
    from pyprune.schedule import UniformSchedule
    from pyprune.solvers import SparsityPattern

    def status(key):
        with open("/proc/self/status") as f:
            return int(re.search(key + r":\\s+(\\d+)", f.read()).group(1)) * 1024

    def measured(fn):
        trim_heap()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident size
        before = status("VmRSS")
        fn()
        return status("VmHWM") - before

    def stream(source, out):
        tokens = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(0))
        prune_streamed(source, out, tokens, "wanda", UniformSchedule(SparsityPattern(sparsity=0.5)), {},
                       RunOptions(batch_size=1, show_progress=False))

    warm, big, out = sys.argv[1:4]
    stream(warm, out + "-warm-up")
    streamed = measured(lambda: stream(big, out))
    held = []


    def load_and_touch():  # every weight is read by a pruning pass; reading makes mapped pages resident
        held.append(AutoModelForCausalLM.from_pretrained(big, dtype=torch.float32))
        held.append(sum(float(p.sum()) for p in held[0].parameters()))

    in_memory = measured(load_and_touch)
    print(json.dumps({"streamed": streamed, "in_memory": in_memory}))
""")


def write_random_llama(folder, layers=32, hidden=512, intermediate=1024, vocab=512):
    """A LLaMA checkpoint with random weights, one shard per decoder layer, written tensor by
    tensor (quicker than building the model, and the test process never holds all of it)."""
    from transformers import LlamaConfig

    from pyprune.pipeline.streaming import load_skeleton, write_safetensors

    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=8,
                         max_position_embeddings=128)
    config.save_pretrained(folder)
    shapes = {k: v.shape for k, v in load_skeleton(str(folder)).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    block = 0.02 * torch.randn(1 << 20, generator=g)  # tiled: drawing every value would dominate the test
    groups = [[k for k in shapes if k.startswith(f"model.layers.{i}.")] for i in range(layers)]
    groups.append([k for k in shapes if not k.startswith("model.layers.")])
    weight_map = {}
    for i, keys in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {k: torch.ones(shapes[k]) if len(shapes[k]) == 1
                   else block.repeat(shapes[k].numel() // block.numel() + 1)[:shapes[k].numel()].view(shapes[k])
                   for k in keys}
        write_safetensors(os.path.join(folder, name), tensors, {k: torch.float32 for k in keys})
        weight_map.update({k: name for k in keys})
    with open(os.path.join(folder, INDEX_NAME), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return str(folder)


def clear_refs_works():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@pytest.mark.skipif(not clear_refs_works(), reason="needs Linux /proc/self/clear_refs to reset the peak RSS")
def test_streamed_peak_memory_stays_far_below_the_model_size(tmp_path):
    warm = write_random_llama(tmp_path / "warm", layers=2)
    source = write_random_llama(tmp_path / "source", layers=32)
    model_bytes = sum(os.path.getsize(os.path.join(source, f)) for f in os.listdir(source) if f.endswith(".safetensors"))
    assert model_bytes > 300e6
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    done = subprocess.run([sys.executable, "-c", MEASURE, warm, source, str(tmp_path / "out")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    peak = json.loads(done.stdout.strip().splitlines()[-1])
    # The measurement sees a whole model when one is loaded ...
    assert peak["in_memory"] > 0.9 * model_bytes, (peak, model_bytes)
    # ... and the streamed run (one layer + statistics + activations) stays under a quarter of it.
    assert peak["streamed"] < 0.25 * model_bytes, (peak, model_bytes)
    assert os.path.exists(tmp_path / "out" / INDEX_NAME)
