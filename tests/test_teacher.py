"""INT4 calibrated against a teacher model (``pyprune.ops.teacher``, ``--int4-teacher``)."""
import json

import pytest
import torch
from torch import nn

from pyprune.cli import main
from pyprune.ops.hessian import accumulate_hessian
from pyprune.ops.teacher import teacher_target
from pyprune.pipeline.statistics import PairedCollector, TeacherCollector
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
    quantizer = LayerQuantizer("gptq", 32, act_order=True, refine_rounds=1)
    stats = statistics(X_teacher, X_own)
    weight, fields = quantizer("layer", pruned.weight, pruned, stats)
    assert torch.equal(weight == 0, pruned.pruned | (weight == 0)) and not weight[pruned.pruned].any()
    assert torch.equal(quantizer.results["layer"].pruned, pruned.pruned)
    assert fields["int4_teacher"] is True and fields["teacher_target_shift"] > 0.01
    plain, _ = LayerQuantizer("gptq", 32, act_order=True, refine_rounds=1)(
        "layer", pruned.weight, pruned, LayerStats(stats.H, stats.nsamples))
    assert (teacher_loss(pruned.weight, X_teacher, weight, X_own)
            < teacher_loss(pruned.weight, X_teacher, plain, X_own))
    joint = sparsegpt_int4_solver(32)(W, LayerStats(stats.H, stats.nsamples), SparsityPattern(0.5))
    with pytest.raises(ValueError, match="joint SparseGPT \\+ INT4 sweep cannot be calibrated"):
        quantizer("layer", joint.weight, joint, stats)


def test_paired_collector_accumulates_the_cross_term():
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 8))
    linears = [("0", block[0]), ("2", block[2])]
    batches = [(torch.randn(2, 5, 16), torch.randn(2, 5, 16)) for _ in range(3)]
    theirs = TeacherCollector(linears, "cpu", sink_weight=4.0)
    own = PairedCollector(linears, "cpu", theirs, sink_weight=4.0)
    seen = {"teacher": [], "own": []}
    for x_teacher, x_own in batches:
        for collector, x, key in ((theirs, x_teacher, "teacher"), (own, x_own, "own")):
            with collector:
                block(x)
            seen[key].append(x)

    def rows(x):  # first position counted 4 times
        x = x.clone()
        x[:, 0] *= 2.0
        return x.reshape(-1, x.shape[-1])

    T = torch.cat([rows(x) for x in seen["teacher"]])
    X = torch.cat([rows(x) for x in seen["own"]])
    n = X.shape[0]
    assert torch.allclose(own.stats["0"].cross, 2.0 / n * T.t() @ X, atol=1e-5)
    assert torch.allclose(own.stats["0"].H, 2.0 / n * X.t() @ X, atol=1e-5)
    assert torch.allclose(theirs.stats["0"].H, 2.0 / n * T.t() @ T, atol=1e-5)
    hidden_t = torch.cat([rows(torch.relu(block[0](x))) for x in seen["teacher"]])
    hidden = torch.cat([rows(torch.relu(block[0](x))) for x in seen["own"]])
    assert torch.allclose(own.stats["2"].cross, 2.0 / n * hidden_t.t() @ hidden, atol=1e-5)
    assert own.stats["0"].cross is not None and theirs.stats["0"].cross is None
    # Without the teacher's batch first, the pairing is refused.
    lonely = PairedCollector(linears, "cpu", TeacherCollector(linears, "cpu"))
    with pytest.raises(RuntimeError, match="teacher's inputs for this batch are missing"):
        with lonely:
            block(torch.randn(1, 5, 16))


def test_cli_teacher_run_prunes_as_without_int4(tiny_saved_model, tmp_path):
    from pyprune.formats.quant_state import load_quant_state
    from transformers import AutoModelForCausalLM

    model_dir, data = tiny_saved_model
    plain, taught = tmp_path / "plain", tmp_path / "taught"
    common = ("--method", "sparsegpt", "--sparsity", "0.5")
    assert main(prune_args(model_dir, data, *common, "--save", str(plain))) == 0
    assert main(prune_args(model_dir, data, *common, "--wbits", "4", "--groupsize", "32", "--int4-teacher",
                           "--save", str(taught))) == 0
    report = json.loads((taught / "pyprune_report.json").read_text())
    assert report["quantization"]["int4_teacher"] is True
    assert report["quantization"]["act_order"] is True  # no joint sweep: prune, then GPTQ
    linears = report["linears"]
    assert all(r["int4_teacher"] and r["quant_method"] == "gptq" for r in linears)
    # Layer 0 sees the same inputs in both models: its target is the pruned weight exactly.
    assert all(r["teacher_target_shift"] == 0.0 for r in linears if ".layers.0." in r["name"])
    assert all(r["teacher_target_shift"] > 0.0 for r in linears if ".layers.1." in r["name"])
    states = load_quant_state(str(taught))
    dense = AutoModelForCausalLM.from_pretrained(plain)
    for name, state in states.items():
        W_plain = dense.get_submodule(name).weight
        assert torch.equal(state.pruned, W_plain == 0), name  # the masks of the run without INT4


@pytest.mark.parametrize("extra, message", [
    (["--int4-teacher"], "--int4-teacher calibrates GPTQ: it needs --wbits 4"),
    (["--int4-teacher", "--wbits", "4", "--groupsize", "32", "--quant-method", "rtn"], "needs --wbits 4 and --quant-method gptq"),
    (["--int4-teacher", "--wbits", "4", "--groupsize", "32", "--activations", "disk"], "two activation streams"),
])
def test_cli_refuses_teacher_runs_it_cannot_do(tiny_saved_model, capsys, extra, message):
    model_dir, data = tiny_saved_model
    assert main(prune_args(model_dir, data, "--method", "sparsegpt", "--sparsity", "0.5", *extra)) == 2
    assert message in capsys.readouterr().err


def test_prune_model_refuses_the_joint_sweep_with_a_teacher(tiny_saved_model):
    from pyprune.models import load_model
    from pyprune.pipeline import RunOptions, prune_model
    from pyprune.schedule import make_schedule
    from pyprune.solvers.pattern import SparsityPattern as Pattern

    model_dir, _ = tiny_saved_model
    model, _ = load_model(str(model_dir))
    schedule = make_schedule("uniform", Pattern(0.5))
    tokens = torch.randint(0, 100, (2, 16))
    options = RunOptions(show_progress=False, int4_teacher=True)
    with pytest.raises(ValueError, match="joint SparseGPT \\+ INT4 sweep"):
        prune_model(model, tokens, sparsegpt_int4_solver(32), schedule, options=options,
                    post_solve=LayerQuantizer("gptq", 32))
