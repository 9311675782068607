"""INT4 calibrated against a teacher model (``pyprune.ops.teacher``, ``--int4-teacher``)."""
import json

import pytest
import torch
from torch import nn

from pyprune.cli import main
from pyprune.ops.hessian import accumulate_hessian
from pyprune.ops.teacher import teacher_target
from pyprune.pipeline.statistics import InputRecorder, PairedCollector
from pyprune.solvers.base import LayerStats
from pyprune.solvers.pattern import SparsityPattern
from pyprune.solvers.quantize import LayerQuantizer, quantize_layer, sparsegpt_int4_solver
from pyprune.solvers.sparsegpt import solve as sparsegpt_solve
from tests.test_cli import prune_args


def drifted_inputs(cols=96, n=2048, drift=0.2, noise=0.05, seed=0):
    """``(teacher inputs, drifted own inputs)`` [n, cols], correlated features. The drift is mostly
    systematic (a fixed linear distortion, as errors of earlier layers are), partly noise."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols ** 0.5 + 0.5 * torch.eye(cols)
    X_teacher = torch.randn(n, cols, generator=g) @ mix
    distortion = torch.eye(cols) + drift * torch.randn(cols, cols, generator=g) / cols ** 0.5
    X_own = X_teacher @ distortion + noise * (torch.randn(n, cols, generator=g) @ mix)
    return X_teacher, X_own


def statistics(X_teacher, X_own):
    H = torch.zeros(X_own.shape[1], X_own.shape[1])
    accumulate_hessian(H, 0, X_own)
    cross = 2.0 / X_own.shape[0] * X_teacher.t() @ X_own
    return LayerStats(H, X_own.shape[0], cross=cross)


def teacher_loss(W, X_teacher, Q, X_own):
    return float((X_teacher @ W.t() - X_own @ Q.t()).pow(2).sum())


def test_target_is_the_dampened_least_squares_weight():
    X_teacher, X_own = drifted_inputs()
    W = torch.randn(40, 96)
    stats = statistics(X_teacher, X_own)
    target = teacher_target(W, stats.H, stats.cross, 0.01)
    # Normal equations of ||W X~ - W* X||^2 + lambda ||W* - W||^2: W* (H + l I) = W (C + l I).
    lam = 0.01 * float(stats.H.diagonal().mean())
    I = torch.eye(96, dtype=torch.float64)
    lhs = target.double() @ (stats.H.double() + lam * I)
    rhs = W.double() @ (stats.cross.double() + lam * I)
    assert torch.allclose(lhs, rhs, rtol=1e-4, atol=1e-4 * float(rhs.abs().max()))
    # Without drift the target is the weight itself.
    same = statistics(X_own, X_own)
    assert torch.allclose(teacher_target(W, same.H, same.cross, 0.01), W, atol=1e-5)
    # Dead inputs of the quantized model leave the solve regular.
    X_dead = X_own.clone()
    X_dead[:, 3] = 0.0
    dead = statistics(X_teacher, X_dead)
    assert torch.isfinite(teacher_target(W, dead.H, dead.cross, 0.01)).all()


def test_gptq_on_the_target_matches_the_teacher_better():
    X_teacher, X_own = drifted_inputs()
    W = torch.randn(40, 96)
    stats = statistics(X_teacher, X_own)
    plain = quantize_layer(W, stats, method="gptq", groupsize=32)
    taught = quantize_layer(teacher_target(W, stats.H, stats.cross, 0.01), stats, method="gptq", groupsize=32)
    assert teacher_loss(W, X_teacher, taught.weight, X_own) < 0.7 * teacher_loss(W, X_teacher, plain.weight, X_own)


def test_layer_quantizer_with_a_teacher_keeps_the_mask_and_reports_the_shift():
    X_teacher, X_own = drifted_inputs()
    W = torch.randn(40, 96)
    teacher_stats = statistics(X_teacher, X_teacher)
    pruned = sparsegpt_solve(W, LayerStats(teacher_stats.H, teacher_stats.nsamples), SparsityPattern(0.5))
    stats = statistics(X_teacher, X_own)
    for refine_target in ("pruned", "original"):
        quantizer = LayerQuantizer("gptq", 32, act_order=True, refine_rounds=1, refine_target=refine_target,
                                   teacher_damp=0.01)
        weight, fields = quantizer("layer", pruned.weight, pruned, stats, original=W)
        assert not weight[pruned.pruned].any()
        assert torch.equal(quantizer.results["layer"].pruned, pruned.pruned)
        assert fields["teacher_damp"] == 0.01 and fields["teacher_target_shift"] > 0.01
        plain, _ = LayerQuantizer("gptq", 32, act_order=True, refine_rounds=1, refine_target=refine_target)(
            "layer", pruned.weight, pruned, LayerStats(stats.H, stats.nsamples), original=W)
        reference = pruned.weight if refine_target == "pruned" else W
        assert (teacher_loss(reference, X_teacher, weight, X_own)
                < teacher_loss(reference, X_teacher, plain, X_own)), refine_target
    joint = sparsegpt_int4_solver(32)(W, LayerStats(stats.H, stats.nsamples), SparsityPattern(0.5))
    with pytest.raises(ValueError, match="joint SparseGPT \\+ INT4 sweep cannot be calibrated"):
        quantizer("layer", joint.weight, joint, stats)
    with pytest.raises(ValueError, match="teacher_damp=0"):
        LayerQuantizer("gptq", 32, teacher_damp=0)


def test_paired_collector_accumulates_the_cross_term_with_the_own_rows_sink_factors():
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 8))
    teacher_block = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 8))
    batches = [(torch.randn(2, 5, 16), torch.randn(2, 5, 16)) for _ in range(3)]
    for x_teacher, _ in batches:
        x_teacher[:, 0] *= 30.0  # a long first row in the teacher only: the cap must not rescale it alone
    recorder = InputRecorder([("0", teacher_block[0]), ("2", teacher_block[2])])
    own = PairedCollector([("0", block[0]), ("2", block[2])], "cpu", recorder.inputs, sink_weight=4.0, sink_cap=True)
    with recorder, own:
        for x_teacher, x_own in batches:
            recorder.new_batch()
            own.new_batch()
            own.teacher = recorder.inputs
            teacher_block(x_teacher)
            block(x_own)

    def rows(x, ref):  # the first position counted 4 times, capped at the median length of ``ref``'s rows
        energy = ref.pow(2).sum(-1)
        factor = 4.0 * (energy[:, 1:].median(dim=1).values / energy[:, 0]).clamp(max=1.0)
        x = x.clone()
        x[:, 0] *= factor.sqrt()[:, None]
        return x.reshape(-1, x.shape[-1])

    T = torch.cat([rows(t, x) for t, x in batches])
    X = torch.cat([rows(x, x) for _, x in batches])
    n = X.shape[0]
    assert torch.allclose(own.stats["0"].cross, 2.0 / n * T.t() @ X, atol=1e-4)
    assert torch.allclose(own.stats["0"].H, 2.0 / n * X.t() @ X, atol=1e-4)
    hidden_t = [torch.relu(teacher_block[0](t)) for t, _ in batches]
    hidden = [torch.relu(block[0](x)) for _, x in batches]
    T2 = torch.cat([rows(t, x) for t, x in zip(hidden_t, hidden)])
    X2 = torch.cat([rows(x, x) for x in hidden])
    assert torch.allclose(own.stats["2"].cross, 2.0 / n * T2.t() @ X2, rtol=1e-4, atol=1e-4)
    # Without the teacher's batch first, the pairing is refused.
    lonely = PairedCollector([("0", block[0])], "cpu", {})
    with pytest.raises(RuntimeError, match="teacher's input for this batch is missing"):
        with lonely:
            block(torch.randn(1, 5, 16))


def _run(model_dir, data, tmp_path, name, *extra):
    out = tmp_path / name
    assert main(prune_args(model_dir, data, *extra, "--save", str(out))) == 0
    return out, json.loads((out / "pyprune_report.json").read_text())


def test_cli_teacher_run_prunes_as_without_int4_and_quantizes_group_by_group(tiny_saved_model, tmp_path):
    from transformers import AutoModelForCausalLM

    from pyprune.formats.quant_state import load_quant_state

    model_dir, data = tiny_saved_model
    common = ("--method", "sparsegpt", "--sparsity", "0.5")
    plain, _ = _run(model_dir, data, tmp_path, "plain", *common)
    taught, report = _run(model_dir, data, tmp_path, "taught", *common, "--wbits", "4", "--groupsize", "32",
                          "--int4-teacher")
    assert not (tmp_path / "taught.progress").exists()
    quant = report["quantization"]
    assert quant["int4_teacher"] is True and quant["teacher_damp"] == 1.0
    assert quant["tune_scales_epochs"] == 0  # scale tuning, on by default with GPTQ, is off with a teacher
    assert quant["act_order"] is True  # no joint sweep: prune, then GPTQ
    shift = {r["name"].split("layers.")[1]: r["teacher_target_shift"] for r in report["linears"]}
    # The first group of layer 0 reads the same inputs in both models: its target is the pruned weight.
    assert all(shift[f"0.self_attn.{p}_proj"] == 0.0 for p in "qkv")
    # o_proj reads attention computed with q/k/v already quantized: drift from inside the layer.
    assert shift["0.self_attn.o_proj"] > 0.0 and shift["1.self_attn.q_proj"] > 0.0
    states = load_quant_state(str(taught))
    dense = AutoModelForCausalLM.from_pretrained(plain)
    for name, state in states.items():
        assert torch.equal(state.pruned, dense.get_submodule(name).weight == 0), name  # the run without INT4


def test_teacher_run_tracks_the_pruned_model_closer(tiny_saved_model, tmp_path):
    """On the calibration windows, the last hidden state of the quantized model is closer to the
    pruned, unquantized model's with the teacher than without."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pyprune.data.calibration import calibration_tokens

    model_dir, data = tiny_saved_model
    common = ("--method", "sparsegpt", "--sparsity", "0.5", "--nsamples", "8")
    quant = ("--wbits", "4", "--groupsize", "32", "--act-order", "--refine-rounds", "0", "--refine-target", "pruned")
    runs = {"pruned": _run(model_dir, data, tmp_path, "p", *common)[0],
            "plain": _run(model_dir, data, tmp_path, "q", *common, *quant)[0],
            "sequential": _run(model_dir, data, tmp_path, "s", *common, *quant, "--true-sequential")[0],
            "teacher": _run(model_dir, data, tmp_path, "t", *common, *quant, "--int4-teacher",
                            "--teacher-damp", "0.01")[0]}
    tokens = calibration_tokens(AutoTokenizer.from_pretrained(model_dir), "c4", 8, 32, 0, data)
    hidden = {}
    for name, folder in runs.items():
        model = AutoModelForCausalLM.from_pretrained(folder)
        with torch.no_grad():
            hidden[name] = model(tokens, output_hidden_states=True).hidden_states[-1]
    error = {name: float((hidden[name] - hidden["pruned"]).norm() / hidden["pruned"].norm())
             for name in ("plain", "sequential", "teacher")}
    assert error["teacher"] < 0.9 * min(error["plain"], error["sequential"]), error


@pytest.mark.parametrize("extra, message", [
    (["--int4-teacher"], "--int4-teacher calibrates GPTQ: it needs --wbits 4"),
    (["--int4-teacher", "--wbits", "4", "--groupsize", "32", "--quant-method", "rtn"],
     "needs --wbits 4 and --quant-method gptq"),
    (["--int4-teacher", "--wbits", "4", "--groupsize", "32", "--activations", "disk"], "two activation streams"),
    (["--int4-teacher", "--wbits", "4", "--groupsize", "32", "--no-act-order"], "joint SparseGPT + INT4 sweep"),
    (["--int4-teacher", "--wbits", "4", "--groupsize", "32", "--progress-dir", "somewhere"], "no progress folder"),
    (["--wbits", "4", "--groupsize", "32", "--teacher-damp", "0.1"], "--teacher-damp 0.1: needs --int4-teacher"),
])
def test_cli_refuses_teacher_runs_it_cannot_do(tiny_saved_model, capsys, extra, message):
    model_dir, data = tiny_saved_model
    assert main(prune_args(model_dir, data, "--method", "sparsegpt", "--sparsity", "0.5", *extra)) == 2
    assert message in capsys.readouterr().err


def test_prune_model_refuses_the_joint_sweep_with_a_teacher(tiny_saved_model):
    from pyprune.models import load_model
    from pyprune.pipeline import RunOptions, prune_model
    from pyprune.schedule import make_schedule

    model_dir, _ = tiny_saved_model
    model, _ = load_model(str(model_dir))
    schedule = make_schedule("uniform", SparsityPattern(0.5))
    tokens = torch.randint(0, 100, (2, 16))
    options = RunOptions(show_progress=False, teacher=True)
    with pytest.raises(ValueError, match="joint SparseGPT \\+ INT4 sweep"):
        prune_model(model, tokens, sparsegpt_int4_solver(32), schedule, options=options,
                    post_solve=LayerQuantizer("gptq", 32))
    with pytest.raises(ValueError, match="needs a quantizer that reads calibration statistics"):
        prune_model(model, tokens, "sparsegpt", schedule, options=options)
