"""Block-wise tuning of INT4 group scales (``pyprune.pipeline.scale_tuning``, ``--tune-scales``)."""
import copy
import json

import pytest
import torch

from pyprune.cli import main
from pyprune.models import decoder_layers, prunable_linears, weight_matrix
from pyprune.ops import int4_grid
from pyprune.pipeline import RunOptions, ScaleTuning, prune_model
from pyprune.schedule import UniformSchedule
from pyprune.solvers import SparsityPattern
from pyprune.solvers.quantize import LayerQuantizer, sparsegpt_int4_solver
from tests.helpers import tiny_model
from tests.test_cli import prune_args


class RecordingQuantizer(LayerQuantizer):
    """A LayerQuantizer that also keeps each Linear's codes as quantized, before any tuning."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.as_quantized = {}

    def __call__(self, name, *args, **kwargs):
        out = super().__call__(name, *args, **kwargs)
        self.as_quantized[name] = self.results[name]
        return out


def calibration(nsamples=8, seqlen=32):
    return torch.randint(0, 128, (nsamples, seqlen), generator=torch.Generator().manual_seed(0))


def quantized_run(model, tuning=None, groupsize=32, activations="device"):
    quantizer = RecordingQuantizer("gptq", groupsize)
    run = prune_model(model, calibration(), sparsegpt_int4_solver(groupsize), UniformSchedule(SparsityPattern(0.5)),
                      {}, RunOptions(batch_size=2, show_progress=False, scale_tuning=tuning, activations=activations),
                      post_solve=quantizer)
    return run, quantizer


def last_hidden(model, tokens):
    with torch.no_grad():
        return model(tokens, output_hidden_states=True).hidden_states[-1]


def test_tuning_moves_only_scales_and_brings_the_model_closer_to_the_dense_one():
    dense = tiny_model("llama")
    tuned_model, plain_model = copy.deepcopy(dense), copy.deepcopy(dense)
    run, quantizer = quantized_run(tuned_model, ScaleTuning(epochs=4, lr=0.01))
    quantized_run(plain_model)
    moved = 0
    for name, q in quantizer.results.items():
        before = quantizer.as_quantized[name]
        assert torch.equal(q.qweight, before.qweight) and torch.equal(q.pruned, before.pruned), name
        int4_grid.check_scales(q.scales)  # fp16-exact and nonzero
        moved += int((q.scales != before.scales).sum())
        module = tuned_model.get_submodule(name)
        assert torch.equal(weight_matrix(module), q.dequantize()), name  # the model runs the tuned scales
        assert torch.equal(weight_matrix(module) == 0, q.pruned | (q.qweight == 0)), name
    assert moved > 0
    for record in run["records"]:
        assert record["scale_tuning_kept_quantizer_scales"] is False
        assert 0 < record["block_error_after_tuning"] < record["block_error_before_tuning"]
    tokens = calibration()
    reference = last_hidden(dense, tokens)

    def error(model):
        return float((last_hidden(model, tokens) - reference).norm() / reference.norm())

    assert error(tuned_model) < 0.95 * error(plain_model)


def test_tuning_that_does_not_lower_the_loss_keeps_the_quantizer_scales():
    model = tiny_model("llama")
    run, quantizer = quantized_run(model, ScaleTuning(epochs=2, lr=100.0))  # Adam steps of ~100 in log scale
    for record in run["records"]:
        assert record["scale_tuning_kept_quantizer_scales"] is True
        assert record["block_error_after_tuning"] == record["block_error_before_tuning"]
    for name, q in quantizer.results.items():
        assert torch.equal(q.scales, quantizer.as_quantized[name].scales), name
        assert torch.equal(weight_matrix(model.get_submodule(name)), q.dequantize()), name


def test_tuning_writes_conv1d_weights_in_their_stored_layout():
    model = tiny_model("gpt2")  # Conv1D keeps its weight as [in, out]
    _, quantizer = quantized_run(model, ScaleTuning(epochs=1))
    for name, module in prunable_linears(decoder_layers(model)[1]):
        q = quantizer.results[f"transformer.h.1.{name}"]
        assert torch.equal(module.weight.data.t(), q.dequantize()), name


@pytest.mark.parametrize("settings, message", [
    ({"epochs": 0}, "epochs=0: must be an integer >= 1"),
    ({"epochs": 1.5}, "epochs=1.5"),
    ({"lr": 0.0}, "lr=0.0: must be > 0"),
])
def test_bad_settings_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        ScaleTuning(**settings)


def test_activations_on_disk_give_the_same_tuned_scales():
    _, in_memory = quantized_run(tiny_model("llama"), ScaleTuning(epochs=1))
    _, on_disk = quantized_run(tiny_model("llama"), ScaleTuning(epochs=1), activations="disk")
    for name, q in in_memory.results.items():
        assert torch.equal(q.scales, on_disk.results[name].scales), name


def test_runner_refuses_tuning_without_int4_codes_or_with_a_teacher():
    schedule = UniformSchedule(SparsityPattern(0.5))
    with pytest.raises(ValueError, match="needs a quantizer"):
        prune_model(tiny_model("llama"), calibration(), "sparsegpt", schedule, {},
                    RunOptions(show_progress=False, scale_tuning=ScaleTuning()))
    with pytest.raises(ValueError, match="cannot be combined with teacher calibration"):
        prune_model(tiny_model("llama"), calibration(), "sparsegpt", schedule, {},
                    RunOptions(show_progress=False, teacher=True, scale_tuning=ScaleTuning()),
                    post_solve=LayerQuantizer("gptq", 32, act_order=True))


def test_cli_tunes_scales_and_reports_them(tiny_saved_model, tmp_path):
    from pyprune.formats.quant_state import load_quant_state

    model_dir, data = tiny_saved_model
    out = tmp_path / "tuned"
    assert main(prune_args(model_dir, data, "--sparsity", "0.5", "--wbits", "4", "--groupsize", "32",
                           "--tune-scales-lr", "0.01", "--save", str(out))) == 0
    report = json.loads((out / "pyprune_report.json").read_text())
    # On by default with GPTQ.
    assert report["quantization"]["tune_scales_epochs"] == 1 and report["quantization"]["tune_scales_lr"] == 0.01
    assert all("block_error_after_tuning" in r for r in report["linears"])
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    for name, state in load_quant_state(str(out)).items():  # the saved codes and scales are the tuned ones
        assert torch.equal(model.get_submodule(name).weight.data, state.dequantize()), name


@pytest.mark.parametrize("extra, message", [
    (["--tune-scales", "2"], "needs --wbits 4 and --quant-method gptq"),
    (["--tune-scales", "2", "--wbits", "4", "--groupsize", "32", "--quant-method", "rtn"], "--quant-method gptq"),
    (["--tune-scales", "-1", "--wbits", "4", "--groupsize", "32"], "--tune-scales -1: must be >= 0"),
    (["--tune-scales-lr", "0.01", "--wbits", "4", "--groupsize", "32", "--tune-scales", "0"], "scale tuning is off"),
    (["--tune-scales-lr", "0.01", "--wbits", "4", "--groupsize", "32", "--quant-method", "rtn"], "scale tuning is off"),
    (["--tune-scales", "1", "--tune-scales-lr", "-1", "--wbits", "4", "--groupsize", "32"], "lr=-1.0"),
    (["--tune-scales", "1", "--wbits", "4", "--groupsize", "32", "--int4-teacher"], "--int4-teacher"),
])
def test_cli_refuses_bad_tuning(tiny_saved_model, capsys, extra, message):
    model_dir, data = tiny_saved_model
    assert main(prune_args(model_dir, data, "--sparsity", "0.5", *extra)) == 2
    assert message in capsys.readouterr().err


def test_streamed_run_tunes_as_the_in_memory_run(tmp_path):
    from transformers import AutoModelForCausalLM

    from pyprune.pipeline.streaming import prune_streamed

    source = tmp_path / "source"
    tiny_model("llama").save_pretrained(source, max_shard_size="40KB")
    in_memory = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    _, memory_quantizer = quantized_run(in_memory, ScaleTuning(epochs=1))
    streamed_quantizer = RecordingQuantizer("gptq", 32)
    prune_streamed(str(source), str(tmp_path / "out"), calibration(), sparsegpt_int4_solver(32),
                   UniformSchedule(SparsityPattern(0.5)), {},
                   RunOptions(batch_size=2, show_progress=False, scale_tuning=ScaleTuning(epochs=1)),
                   post_solve=streamed_quantizer)
    streamed = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    for name, q in memory_quantizer.results.items():
        assert torch.equal(q.scales, streamed_quantizer.results[name].scales), name
        assert torch.equal(weight_matrix(streamed.get_submodule(name)), weight_matrix(in_memory.get_submodule(name)))
