import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from pyprune.cli import main


def prune_args(model_dir, data, *extra):
    return ["prune", model_dir, "--data-dir", data, "--nsamples", "4", "--seqlen", "32", "--seed", "0",
            "--device", "cpu", "--quiet", *extra]


def test_prune_save_report_and_reload(tiny_saved_model, tmp_path, capsys):
    model_dir, data = tiny_saved_model
    out = tmp_path / "pruned"
    code = main(prune_args(model_dir, data, "--method", "sparsegpt", "--sparsity", "0.5",
                           "--eval-windows", "3", "--eval-seqlen", "32", "--save", str(out)))
    assert code == 0
    report = json.loads((out / "pyprune_report.json").read_text())
    assert report["totals"]["achieved_sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert report["totals"]["ppl"] > 1 and report["eval"]["windows"] == 3
    assert {"name", "shape", "target", "achieved_sparsity", "loss", "seconds"} <= set(report["linears"][0])
    # relative error = ||dW X||^2 / ||W X||^2, the fraction of each Linear's output lost; here well inside (0, 1)
    rel = [r["relative_error"] for r in report["linears"]]
    assert all(0 < v < 1 for v in rel) and report["totals"]["mean_relative_error"] == pytest.approx(sum(rel) / len(rel))
    assert len(report["linears"]) == 14 and report["versions"]["torch"] == torch.__version__
    # the saved folder is a normal Hugging Face checkpoint holding zeros ...
    model = AutoModelForCausalLM.from_pretrained(out)
    W = model.model.layers[1].mlp.down_proj.weight
    assert (W == 0).float().mean().item() == pytest.approx(0.5, abs=1e-3)
    # ... and `pyprune eval` gives the same perplexity
    capsys.readouterr()
    assert main(["eval", str(out), "--data-dir", data, "--max-windows", "3", "--eval-seqlen", "32",
                 "--device", "cpu", "--quiet"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["ppl"] == pytest.approx(report["totals"]["ppl"], rel=1e-4)


def test_nm_pattern_and_explicit_report_path(tiny_saved_model, tmp_path):
    model_dir, data = tiny_saved_model
    path = tmp_path / "r.json"
    assert main(prune_args(model_dir, data, "--method", "wanda", "--pattern", "2:4", "--report", str(path))) == 0
    report = json.loads(path.read_text())
    assert all(r["target"] == "2:4" for r in report["linears"])
    assert report["totals"]["achieved_sparsity"] == pytest.approx(0.5, abs=1e-6)


@pytest.mark.parametrize("extra, message", [
    (["--sparsity", "1.2"], "1.2"),
    (["--pattern", "2:3"], "multiple of 3"),
    (["--pattern", "4:2"], "4:2"),
    (["--sparsity", "0.5", "--method", "obs-magic"], "obs-magic"),
    (["--method", "none", "--wbits", "4", "--groupsize", "32", "--quant-method", "rtn", "--refine-rounds", "2"],
     "--refine-rounds is a GPTQ option"),
    (["--method", "none", "--wbits", "4", "--groupsize", "32", "--refine-rounds", "-1"], "--refine-rounds -1"),
    (["--sparsity", "0.5", "--method", "wanda", "--final-solve"], "--final-solve applies to --method admm or sparsegpt"),
    (["--sparsity", "0.5", "--wbits", "4", "--groupsize", "32", "--final-solve", "--no-act-order"],
     "the joint sweep (--no-act-order) has no final solve"),
    (["--method", "none", "--wbits", "4", "--groupsize", "32", "--quant-method", "rtn", "--quant-damp", "0.1"],
     "--quant-damp is GPTQ's dampening"),
    (["--sparsity", "0.5", "--wbits", "4", "--groupsize", "32", "--no-act-order", "--quant-damp", "0.1"],
     "the joint SparseGPT + INT4 sweep"),
    (["--method", "none", "--wbits", "4", "--groupsize", "32", "--quant-damp", "0"], "--quant-damp 0.0"),
    (["--sparsity", "0.5", "--method", "magnitude", "--sink-cap"], "--sink-cap shapes the calibration statistics"),
    (["--sparsity", "0.5", "--method", "magnitude", "--true-sequential"], "--method magnitude without GPTQ"),
    (["--sparsity", "0.5", "--schedule", "hessian", "--sparsity-range", "0.4", "0.6", "--true-sequential"],
     "--true-sequential cannot be used with --schedule hessian"),
])
def test_bad_input_is_refused_with_a_clear_error(tiny_saved_model, capsys, extra, message):
    model_dir, data = tiny_saved_model
    args = prune_args(model_dir, data, *extra)
    if "--method" not in extra:
        args += ["--method", "sparsegpt"]
    try:
        code = main(args)
    except SystemExit as exc:  # argparse refuses unknown choices itself
        code = exc.code
    assert code == 2
    assert message in capsys.readouterr().err


def test_missing_data_files_name_the_path(tiny_saved_model, tmp_path, capsys):
    model_dir, _ = tiny_saved_model
    empty = tmp_path / "nodata"
    empty.mkdir()
    assert main(prune_args(model_dir, str(empty), "--sparsity", "0.5")) == 2
    err = capsys.readouterr().err
    assert str(empty) in err and "expected layout" in err


def test_missing_model_folder_is_named(tmp_path, capsys, data_dir):
    missing = str(tmp_path / "no" / "model")
    assert main(["prune", missing, "--sparsity", "0.5", "--data-dir", data_dir]) == 2
    assert missing in capsys.readouterr().err


@pytest.mark.parametrize("scale_fit, refine_rounds", [("minmax", 0), ("mse", 0), ("minmax", 2)])
def test_int4_joint_with_sparsegpt_saves_codes_that_reload(tiny_saved_model, tmp_path, capsys, scale_fit,
                                                           refine_rounds):
    from pyprune.formats.quant_state import load_quant_state

    model_dir, data = tiny_saved_model
    out = tmp_path / "q"
    assert main(prune_args(model_dir, data, "--method", "sparsegpt", "--pattern", "2:4", "--wbits", "4",
                           "--groupsize", "32", "--scale-fit", scale_fit, "--no-act-order",
                           "--refine-rounds", str(refine_rounds), "--save", str(out))) == 0
    report = json.loads((out / "pyprune_report.json").read_text())
    assert report["quantization"]["act_order"] is False
    assert report["quantization"]["bits_per_weight"] < 4
    assert report["quantization"]["scale_fit"] == scale_fit
    assert all(r["scale_fit"] == scale_fit for r in report["linears"])
    assert report["quantization"]["refine_rounds"] == refine_rounds
    assert all(r["refine_rounds"] == refine_rounds for r in report["linears"])
    if refine_rounds:  # the refinement never raises a layer's loss
        assert all(r["refine_loss_ratio"] <= 1.0 for r in report["linears"])
    states = load_quant_state(str(out))
    model = AutoModelForCausalLM.from_pretrained(out)
    W = model.model.layers[0].self_attn.q_proj.weight
    state = states["model.layers.0.self_attn.q_proj"]
    assert torch.equal(state.dequantize(), W)  # saved weights are exactly scale * integer
    assert torch.equal(state.pruned, W == 0) or bool((state.pruned <= (W == 0)).all())


def test_sparsegpt_with_int4_defaults_to_the_joint_sweep_and_refinement(tiny_saved_model, tmp_path):
    model_dir, data = tiny_saved_model
    out = tmp_path / "q"
    assert main(prune_args(model_dir, data, "--method", "sparsegpt", "--sparsity", "0.5", "--wbits", "4",
                           "--groupsize", "32", "--save", str(out))) == 0
    report = json.loads((out / "pyprune_report.json").read_text())
    assert report["quantization"]["act_order"] is False and report["quantization"]["refine_rounds"] == 4
    assert all(r["quant_method"] == "sparsegpt+gptq" and r["refine_loss_ratio"] <= 1.0 for r in report["linears"])


def test_quant_damp_reaches_gptq_after_pruning_and_leaves_the_pruning_alone(tiny_saved_model, tmp_path):
    model_dir, data = tiny_saved_model
    reports = {}
    for name, extra in {"same": [], "stronger": ["--quant-damp", "0.5"]}.items():
        path = tmp_path / f"{name}.json"
        assert main(prune_args(model_dir, data, "--method", "sparsegpt", "--sparsity", "0.5", "--wbits", "4",
                               "--groupsize", "32", "--act-order", *extra, "--report", str(path))) == 0
        reports[name] = json.loads(path.read_text())
    assert reports["same"]["quantization"]["damp"] == 0.01
    assert reports["stronger"]["quantization"]["damp"] == 0.5
    for name, damp in (("same", 0.01), ("stronger", 0.5)):
        for record in reports[name]["linears"]:
            assert record["damp"] == pytest.approx(0.01)  # SparseGPT's pruning
            assert record["quant_damp"] == pytest.approx(damp)


@pytest.mark.parametrize("method, extra, capped", [
    ("sparsegpt", [], True),  # sink weight 256 by default
    ("sparsegpt", ["--no-sink-cap"], False),
    ("sparsegpt", ["--sink-weight", "1"], False),
    ("wanda", [], False),  # sink weight 1 by default
    ("wanda", ["--sink-weight", "4"], True),
])
def test_sink_cap_defaults_to_on_where_the_sink_weight_is_above_one(tiny_saved_model, tmp_path, method, extra,
                                                                     capped):
    model_dir, data = tiny_saved_model
    path = tmp_path / "report.json"
    assert main(prune_args(model_dir, data, "--method", method, "--sparsity", "0.5", *extra,
                           "--report", str(path))) == 0
    assert json.loads(path.read_text())["config"]["sink_cap"] is capped


def test_true_sequential_run_is_recorded_and_changes_the_later_groups(tiny_saved_model, tmp_path):
    model_dir, data = tiny_saved_model
    reports = {}
    for name, extra in {"together": [], "sequential": ["--true-sequential"]}.items():
        path = tmp_path / f"{name}.json"
        assert main(prune_args(model_dir, data, "--method", "sparsegpt", "--sparsity", "0.5", *extra,
                               "--report", str(path))) == 0
        reports[name] = json.loads(path.read_text())
    assert reports["sequential"]["config"]["true_sequential"] is True
    losses = {name: {r["name"]: r["loss"] for r in report["linears"]} for name, report in reports.items()}
    first = [n for n in losses["together"] if n.endswith("0.self_attn.q_proj")]
    later = [n for n in losses["together"] if n.endswith("0.self_attn.o_proj")]
    assert first and later
    assert losses["sequential"][first[0]] == pytest.approx(losses["together"][first[0]], rel=1e-6)
    assert losses["sequential"][later[0]] != pytest.approx(losses["together"][later[0]], rel=1e-6)


def test_sparsegpt_final_solve_then_int4_refined_towards_the_original(tiny_saved_model, tmp_path):
    model_dir, data = tiny_saved_model
    reports = {}
    for name, extra in {"greedy": [], "final": ["--final-solve"]}.items():
        path = tmp_path / f"{name}.json"
        assert main(prune_args(model_dir, data, "--method", "sparsegpt", "--sparsity", "0.5", "--wbits", "4",
                               "--groupsize", "32", "--act-order", "--refine-target", "original", *extra,
                               "--report", str(path))) == 0
        reports[name] = json.loads(path.read_text())
    final = reports["final"]
    assert final["config"]["final_solve"] is True and final["quantization"]["act_order"] is True
    assert final["quantization"]["refine_target"] == "original"
    assert all(r["final_solve"] and r["quant_method"] == "gptq" for r in final["linears"])
    assert "final_solve" not in reports["greedy"]["linears"][0]
    assert all(r["pruned_fraction"] == pytest.approx(0.5, abs=1e-3) for r in final["linears"])


def test_quantization_only_and_compressed_checkpoint(tiny_saved_model, tmp_path, capsys):
    model_dir, data = tiny_saved_model
    out, packed = tmp_path / "q", tmp_path / "packed"
    assert main(prune_args(model_dir, data, "--method", "none", "--wbits", "4", "--groupsize", "32",
                           "--save", str(out))) == 0
    # quantization alone removes nothing, yet the final weights do lose part of each output
    report = json.loads((out / "pyprune_report.json").read_text())
    assert report["quantization"]["act_order"] is True  # GPTQ's default
    assert report["quantization"]["refine_rounds"] == 4  # and so is the refinement
    linears = report["linears"]
    assert all(r["loss"] == 0 and 0 < r["relative_error"] < 0.1 for r in linears)
    assert main(["compress", str(out), "--format", "int4", "--out", str(packed)]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["packed"] == line["linears"] == 14
    capsys.readouterr()
    evals = []
    for path in (out, packed):
        assert main(["eval", str(path), "--data-dir", data, "--max-windows", "2", "--eval-seqlen", "32",
                     "--device", "cpu", "--quiet"]) == 0
        evals.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["ppl"])
    assert evals[1] == pytest.approx(evals[0], rel=2e-3)  # fp16 rounding of the dense parts only


def test_admm_from_the_command_line(tiny_saved_model, tmp_path):
    model_dir, data = tiny_saved_model
    path = tmp_path / "r.json"
    assert main(prune_args(model_dir, data, "--method", "admm", "--sparsity", "0.6", "--admm-iters", "6",
                           "--admm-mask-steps", "4", "--report", str(path))) == 0
    report = json.loads(path.read_text())
    assert report["totals"]["achieved_sparsity"] == pytest.approx(0.6, abs=2e-3)
    assert report["config"]["admm_iters"] == 6 and report["linears"][0]["iterations"] == 6


def test_groupsize_not_dividing_a_width_is_refused(tiny_saved_model, capsys):
    model_dir, data = tiny_saved_model
    assert main(prune_args(model_dir, data, "--method", "none", "--wbits", "4", "--groupsize", "256")) == 2
    assert "groupsize=256" in capsys.readouterr().err


def test_eval_runs_harness_tasks_on_the_loaded_model(tiny_saved_model, tmp_path, capsys):
    pytest.importorskip("lm_eval")
    from tests.test_harness import TASK, write_task

    model_dir, data = tiny_saved_model
    write_task(str(tmp_path), n_items=8)
    report_path = tmp_path / "r.json"
    assert main(["eval", model_dir, "--data-dir", data, "--max-windows", "1", "--eval-seqlen", "32",
                 "--device", "cpu", "--quiet", "--tasks", TASK, "--task-dir", str(tmp_path),
                 "--report", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    acc = report["zero_shot"]["tasks"][TASK]["acc"]
    assert 0.0 <= acc <= 1.0 and report["zero_shot"]["tasks"][TASK]["n"] == 8
    assert report["zero_shot"]["mean_acc"] == acc and report["eval"]["windows"] == 1
    assert main(["eval", model_dir, "--data-dir", data, "--device", "cpu", "--quiet",
                 "--tasks", "no_such_task_xyz", "--task-dir", str(tmp_path)]) == 2
    assert "no_such_task_xyz" in capsys.readouterr().err


def test_hessian_schedule_and_plot(tiny_saved_model, tmp_path):
    model_dir, data = tiny_saved_model
    path = tmp_path / "r.json"
    assert main(prune_args(model_dir, data, "--method", "sparsegpt", "--sparsity", "0.7", "--schedule", "hessian",
                           "--sparsity-range", "0.6", "0.8", "--levels", "2", "--report", str(path))) == 0
    report = json.loads(path.read_text())
    assert report["totals"]["achieved_sparsity"] == pytest.approx(0.7, abs=2e-3)
    assert report["schedule"]["normalise"] == "residual"
    assert all(u["residual_energy"] > 0 for u in report["schedule"]["units"])
    per_layer = {r["name"].split(".")[2]: r["target_sparsity"] for r in report["linears"]}
    assert all(0.6 - 1e-9 <= s <= 0.8 + 1e-9 for s in per_layer.values())
    png = tmp_path / "plot.png"
    assert main(["plot", str(path), "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    raw = tmp_path / "raw.json"
    assert main(prune_args(model_dir, data, "--method", "sparsegpt", "--sparsity", "0.7", "--schedule", "hessian",
                           "--schedule-normalise", "none", "--report", str(raw))) == 0
    assert json.loads(raw.read_text())["schedule"]["normalise"] == "none"


@pytest.mark.parametrize("method", ["sparsegpt", "wanda"])
def test_streamed_prune_matches_in_memory(tiny_saved_model, tmp_path, method):
    """Streamed runs give the in-memory weights; wanda streamed keeps only input norms by default
    (no per-Linear loss) and still selects the same masks."""
    model_dir, data = tiny_saved_model
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(model_dir).save_pretrained(sharded, max_shard_size="60KB")
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(model_dir).save_pretrained(sharded)
    assert len(list(sharded.glob("*.safetensors"))) > 1
    streamed, memory = tmp_path / "streamed", tmp_path / "memory"
    for out, extra in ((streamed, ["--stream"]), (memory, [])):
        assert main(prune_args(str(sharded), data, "--method", method, "--sparsity", "0.5",
                               "--save", str(out), *extra)) == 0
    a = AutoModelForCausalLM.from_pretrained(streamed).state_dict()
    b = AutoModelForCausalLM.from_pretrained(memory).state_dict()
    for name in b:
        assert torch.allclose(a[name], b[name], atol=1e-6), name
        assert torch.equal(a[name] == 0, b[name] == 0), name
    reports = [json.loads((out / "pyprune_report.json").read_text()) for out in (streamed, memory)]
    assert [r["config"]["layer_loss"] for r in reports] == [False, True]
    # the attention sink is weighted by default where a Hessian drives a reconstruction
    assert {r["config"]["sink_weight"] for r in reports} == {256.0 if method == "sparsegpt" else 1.0}
    assert {r["config"]["sink_cap"] for r in reports} == {method == "sparsegpt"}
    losses = [[x["loss"] for x in r["linears"]] for r in reports]
    assert all(v == v for v in losses[1])  # reported in memory
    assert all(v == v for v in losses[0]) == (method == "sparsegpt")  # wanda streamed: nan


def test_self_calibration_from_the_command_line_with_a_prefix(tiny_saved_model, tmp_path):
    from pyprune.data.calibration_file import load_calibration

    model_dir, data = tiny_saved_model
    calib, report_path = tmp_path / "calib.safetensors", tmp_path / "r.json"
    assert main(prune_args(model_dir, data, "--method", "wanda", "--sparsity", "0.5", "--calib", "self",
                           "--calib-prefix", "</s>", "--calib-temperature", "0.8", "--save-calib", str(calib),
                           "--report", str(report_path))) == 0
    info = json.loads(report_path.read_text())["calibration"]
    assert info["source"] == "self" and info["prefix_ids"] == [2] and info["temperature"] == 0.8
    tokens, _ = load_calibration(str(calib), nsamples=4, seqlen=32)
    assert tokens.shape == (4, 32) and (tokens[:, 0] == 2).all()
