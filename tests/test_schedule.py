import json
import math
import random

import pytest
import torch

from pyprune.models import decoder_layers, prunable_linears, weight_matrix
from pyprune.ops.hessian import accumulate_hessian, inverse_hessian_factor
from pyprune.pipeline import RunOptions, prune_model
from pyprune.pipeline.prepass import run_prepass
from pyprune.schedule import NORMALISATIONS, HessianSchedule, OWLSchedule, make_schedule
from pyprune.schedule.estimate import estimate_linears, obs_error, obs_error_curve, obs_scores
from pyprune.schedule.levels import allocate, cluster_1d, fit_mean, weighted_mean
from pyprune.schedule.owl import outlier_ratio, owl_sparsities
from pyprune.solvers import LayerStats, SparsityPattern, sparsegpt
from tests.helpers import Killed, correlated_inputs, sparsegpt_killed_after, tiny_model


def stats_of(X):
    H = torch.zeros(X.shape[1], X.shape[1])
    return LayerStats(H, accumulate_hessian(H, 0, X))


def deep_llama(layers=4, seed=0):
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = tf.LlamaForCausalLM(cfg).eval()
    model.config.use_cache = False
    return model


def calib(nsamples=4, seqlen=32, seed=0):
    return torch.randint(0, 128, (nsamples, seqlen), generator=torch.Generator().manual_seed(seed))


def options(**kw):
    return RunOptions(batch_size=2, show_progress=False, **kw)


# -- allocation invariants -----------------------------------------------------------------------

def assert_allocation(errors, params, sparsities, target, lo, hi):
    assert weighted_mean(sparsities, params) == pytest.approx(target, abs=1e-9)
    assert all(lo - 1e-12 <= s <= hi + 1e-12 for s in sparsities)
    for i in range(len(errors)):
        for j in range(len(errors)):
            if errors[i] > errors[j]:
                assert sparsities[i] <= sparsities[j] + 1e-12, (i, j)


@pytest.mark.parametrize("trial", range(12))
def test_allocation_hits_the_mean_inside_the_range_and_is_monotone(trial):
    rng = random.Random(trial)
    n = rng.randint(2, 40)
    errors = [math.exp(rng.gauss(0, 3)) for _ in range(n)]
    params = [rng.choice([1, 3, 10]) * rng.randint(100, 1000) for _ in range(n)]
    lo = rng.uniform(0.3, 0.65)
    hi = rng.uniform(lo + 0.01, 0.95)
    target = rng.uniform(lo, hi)
    k = rng.randint(1, 8)
    alloc = allocate(errors, params, target, lo, hi, k)
    assert_allocation(errors, params, alloc.sparsities, target, lo, hi)
    assert alloc.nlevels == min(k, n)
    if alloc.nlevels > 1 and lo < target < hi:  # really non-uniform, not a collapsed answer
        assert max(alloc.sparsities) - min(alloc.sparsities) > 1e-3


def test_extreme_levels_get_the_ends_of_the_range():
    alloc = allocate([1.0, 10.0, 1000.0], [1, 1, 1], 0.7, 0.6, 0.8, 3)
    assert alloc.sparsities == pytest.approx([0.8, 0.7, 0.6], abs=1e-12)
    assert alloc.levels == [0, 1, 2]


def test_equal_errors_give_the_uniform_schedule():
    alloc = allocate([3.5] * 7, [10, 20, 10, 5, 5, 5, 40], 0.72, 0.6, 0.8, 4)
    assert alloc.sparsities == pytest.approx([0.72] * 7, abs=1e-12)
    assert alloc.nlevels == 1


def test_renormalisation_with_fixed_units_keeps_the_global_mean():
    errors = [5.0, 0.1, 40.0, 2.0, 0.5, 9.0]
    params = [4, 4, 4, 8, 8, 8]
    fixed = {0: 0.6, 1: 0.8}
    alloc = allocate(errors, params, 0.7, 0.6, 0.8, 3, fixed=fixed)
    assert alloc.sparsities[:2] == [0.6, 0.8]
    assert weighted_mean(alloc.sparsities, params) == pytest.approx(0.7, abs=1e-12)
    assert all(0.6 <= s <= 0.8 for s in alloc.sparsities)


def test_fit_mean_reaches_the_ends_of_the_range():
    assert fit_mean([0.1, 0.5], [1, 1], 0.8, 0.6, 0.8) == pytest.approx([0.8, 0.8])
    with pytest.raises(ValueError, match="cannot be reached"):
        fit_mean([0.1, 0.5], [1, 1], 0.9, 0.6, 0.8)


def test_one_dimensional_clustering_is_optimal_and_ordered():
    values = [10.0, 1.0, 5.1, 1.2, 5.0, 1.1]
    assert cluster_1d(values, 3) == [2, 0, 1, 0, 1, 0]
    assert cluster_1d(values, 1) == [0] * 6
    assert cluster_1d([2.0, 2.0, 7.0], 5) == [0, 0, 1]  # no more levels than distinct values
    # Brute force over all 2-cluster splits of random points.
    rng = random.Random(3)
    xs = sorted(rng.gauss(0, 1) for _ in range(9))
    def sse(part):
        m = sum(part) / len(part)
        return sum((x - m) ** 2 for x in part)
    best = min(range(1, 9), key=lambda c: sse(xs[:c]) + sse(xs[c:]))
    assert cluster_1d(xs, 2) == [0] * best + [1] * (9 - best)


def test_bad_configuration_is_refused_with_the_value():
    with pytest.raises(ValueError, match=r"0\.85 is outside the sparsity range \[0\.6, 0\.8\]"):
        make_schedule("hessian", 0.85)
    with pytest.raises(ValueError, match="levels=0"):
        make_schedule("hessian", 0.7, levels=0)
    with pytest.raises(ValueError, match="granularity='row'"):
        make_schedule("hessian", 0.7, granularity="row")
    with pytest.raises(ValueError, match=r"\[0\.8, 0\.6\] is invalid"):
        make_schedule("hessian", 0.7, sparsity_range=(0.8, 0.6))
    with pytest.raises(ValueError, match="unknown schedule 'best'.*uniform, owl, hessian"):
        make_schedule("best", 0.7)
    with pytest.raises(ValueError, match=r"target 0\.7 and lambda 0\.3 could leave \[0, 1\)"):
        make_schedule("owl", 0.7, owl_lambda=0.3)
    with pytest.raises(ValueError, match="lambda=0.6"):
        make_schedule("owl", 0.7, owl_lambda=0.6)
    for name in ("owl", "hessian"):
        with pytest.raises(ValueError, match="2:4 is an N:M pattern"):
            make_schedule(name, SparsityPattern.parse("2:4"))
    assert make_schedule("uniform", SparsityPattern.parse("2:4")).pattern_for(0, "x").nm == (2, 4)


# -- the OBS estimate ----------------------------------------------------------------------------

def test_cholesky_rows_are_the_inverse_hessians_of_the_reduced_problems():
    """"Sequentially pruning all": U_jj^2 = [(H_d[j:, j:])^-1]_00 for every j."""
    X = correlated_inputs(300, 24, seed=4)
    H = stats_of(X).H
    f = inverse_hessian_factor(H, 0.01)
    Hd = H.double() + 0.01 * torch.diag(H).mean().double() * torch.eye(24, dtype=torch.float64)
    for j in range(24):
        reduced = torch.linalg.inv(Hd[j:, j:])[0, 0]
        assert float(f.U[j, j].double() ** 2) == pytest.approx(float(reduced), rel=1e-4)


def test_estimate_is_exact_without_correlations():
    """With a diagonal Hessian no compensation happens, so the estimate is SparseGPT's loss."""
    g = torch.Generator().manual_seed(1)
    d = 160  # two blocks of 128 columns and a partial one
    H = torch.diag(torch.rand(d, generator=g) * 3 + 0.1)
    W = torch.randn(48, d, generator=g)
    stats = LayerStats(H, 100)
    for s in (0.3, 0.7):
        result = sparsegpt.solve(W, stats, SparsityPattern(sparsity=s))
        # damped: the sweep's loss under H + delta I; undamped: the real reconstruction loss
        assert obs_error(W, stats, s, undamped=False) == pytest.approx(result.info["obs_loss"], rel=1e-5)
        assert obs_error(W, stats, s) == pytest.approx(result.loss, rel=1e-4)
        assert result.loss < 0.99 * result.info["obs_loss"]  # the dampening term is really there


def test_estimate_curve_is_increasing_and_dead_inputs_are_free():
    X = correlated_inputs(200, 32, seed=2)
    X[:, 5] = 0.0  # a dead input
    stats = stats_of(X)
    W = torch.randn(16, 32, generator=torch.Generator().manual_seed(2))
    f = inverse_hessian_factor(stats.H)
    scores = obs_scores(W, f.U, f.dead)
    assert (scores[:, 5] == 0).all()
    curve = obs_error_curve(scores, [0.0, 0.2, 0.5, 0.8])
    assert curve[0] == 0.0 and all(a < b for a, b in zip(curve, curve[1:]))


def test_estimate_orders_layers_like_the_actual_sparsegpt_loss():
    """A layer whose weights are all of similar size (nothing cheap to remove) is much more
    sensitive than one with heavy-tailed weights of the same norm and the same inputs."""
    g = torch.Generator().manual_seed(7)
    d, rows = 128, 64
    X = correlated_inputs(1024, d, seed=7)
    stats = stats_of(X)
    uniform = torch.sign(torch.randn(rows, d, generator=g)) * (1 + 0.1 * torch.rand(rows, d, generator=g))
    heavy = torch.randn(rows, d, generator=g) ** 5
    heavy *= uniform.norm() / heavy.norm()
    layers = {"robust": heavy, "sensitive": uniform, "sensitive_x3": 3 * uniform, "robust_x2": 2 * heavy}
    for s, undamped in ((0.5, True), (0.7, True), (0.7, False)):
        est = {k: obs_error(W, stats, s, undamped=undamped) for k, W in layers.items()}
        act = {k: sparsegpt.solve(W, stats, SparsityPattern(sparsity=s)).loss for k, W in layers.items()}
        assert sorted(est, key=est.get) == sorted(act, key=act.get)
        assert act["sensitive"] > 5 * act["robust"] and est["sensitive"] > 5 * est["robust"]


def test_undamped_estimate_is_not_inflated_by_a_massive_activation():
    """One huge input feature makes the dampening (1 % of the mean Hessian diagonal) dwarf the
    other inputs' variance; the damped OBS loss is then mostly the weight-decay term."""
    g = torch.Generator().manual_seed(11)
    X = correlated_inputs(2048, 128, seed=11)
    X[:, 0] *= 300.0
    stats = stats_of(X)
    W = torch.randn(64, 128, generator=g)
    actual = sparsegpt.solve(W, stats, SparsityPattern(sparsity=0.7)).loss
    damped = obs_error(W, stats, 0.7, undamped=False)
    undamped = obs_error(W, stats, 0.7)
    assert damped > 3 * actual
    assert abs(math.log(undamped / actual)) < 0.5 * abs(math.log(damped / actual))


def test_shared_inputs_share_one_factorisation():
    X = correlated_inputs(256, 32, seed=5)
    a, b = stats_of(X), stats_of(X)
    W = {"q": torch.randn(16, 32), "k": torch.randn(8, 32)}
    together = estimate_linears(W, {"q": a, "k": b}, [0.6])
    assert together["k"][0] == pytest.approx(obs_error(W["k"], b, 0.6), rel=1e-6)
    assert together["q"][0] == pytest.approx(obs_error(W["q"], a, 0.6), rel=1e-6)


# -- OWL -----------------------------------------------------------------------------------------

def test_outlier_ratio_counts_scores_above_m_times_the_mean():
    W = torch.ones(4, 10)
    W[0, 0] = 100.0  # mean score = (39 + 100) / 40 = 3.475; only the 100 exceeds 5x the mean
    norms = torch.ones(10)
    assert outlier_ratio([W], [norms], 5.0) == pytest.approx(1 / 40)
    assert outlier_ratio([W], [norms], 0.1) == 1.0
    # input norms enter the score: a strong input column makes its weights outliers
    norms2 = torch.ones(10)
    norms2[3] = 60.0
    assert outlier_ratio([torch.ones(4, 10)], [norms2], 5.0) == pytest.approx(4 / 40)


def test_owl_preserves_the_mean_and_orders_by_outlier_ratio():
    rng = random.Random(0)
    ratios = [rng.uniform(0.001, 0.05) for _ in range(12)]
    params = [rng.choice([100, 200]) for _ in ratios]
    s = owl_sparsities(ratios, params, 0.7, 0.08)
    assert weighted_mean(s, params) == pytest.approx(0.7, abs=1e-12)
    assert max(s) - min(s) == pytest.approx(0.16, abs=1e-12)  # the full +-lambda spread
    order = sorted(range(12), key=lambda i: ratios[i])
    assert all(s[a] >= s[b] for a, b in zip(order, order[1:]))  # more outliers, lower sparsity
    assert owl_sparsities([0.02] * 5, [1] * 5, 0.7, 0.08) == [0.7] * 5


# -- through the pipeline ------------------------------------------------------------------------

def per_layer_sparsity(records, layers):
    out = []
    for k in range(layers):
        rs = [r for r in records if f".{k}." in r["name"]]
        out.append(sum(r["achieved_sparsity"] * r["shape"][0] * r["shape"][1] for r in rs) /
                   sum(r["shape"][0] * r["shape"][1] for r in rs))
    return out


@pytest.mark.parametrize("method", ["sparsegpt", "admm", "wanda"])
@pytest.mark.parametrize("name", ["hessian", "owl"])
def test_schedules_run_end_to_end_with_every_solver(name, method):
    model = deep_llama()
    schedule = make_schedule(name, 0.7, levels=3, owl_lambda=0.05)
    result = prune_model(model, calib(), method, schedule, {}, options())
    units = schedule.describe()["units"]
    assigned = [u["sparsity"] for u in units]
    assert len(set(round(a, 9) for a in assigned)) > 1  # really non-uniform
    assert weighted_mean(assigned, [u["parameters"] for u in units]) == pytest.approx(0.7, abs=1e-6)
    achieved = per_layer_sparsity(result["records"], 4)
    # wanda rounds per row (64 columns), the OBS solvers per block or per layer
    tol = 0.5 / 64 if method == "wanda" else 1e-3
    assert achieved == pytest.approx(assigned, abs=tol)
    for r in result["records"]:
        layer = int(r["name"].split(".")[2])
        assert r["target_sparsity"] == assigned[layer]
    for layer in decoder_layers(model):
        for _, m in prunable_linears(layer):
            assert torch.isfinite(weight_matrix(m)).all()


def test_output_normalised_scores_are_scale_free():
    """Scaling a layer's weights scales its OBS loss by c^2 but not the fraction of its output
    energy that pruning destroys."""
    X = correlated_inputs(256, 32, seed=9)
    stats = {"a": stats_of(X), "b": stats_of(X)}
    W = {"a": torch.randn(16, 32, generator=torch.Generator().manual_seed(9))}
    raw, rel = (HessianSchedule(SparsityPattern(sparsity=0.7), normalise=n) for n in ("none", "output"))
    for schedule in (raw, rel):
        schedule.prepass_observe(0, stats, W)
        schedule.prepass_observe(1, stats, {"a": 5.0 * W["a"]})
    assert raw.units[1].dense == pytest.approx(25.0 * raw.units[0].dense, rel=1e-4)
    assert rel.units[1].dense == pytest.approx(rel.units[0].dense, rel=1e-4)
    assert 0 < rel.units[0].dense < 1
    with pytest.raises(ValueError, match="normalise='energy'"):
        make_schedule("hessian", 0.7, normalise="energy")


def test_residual_normalised_scores_divide_by_the_residual_energy():
    """Equal OBS losses: the layer writing into the larger residual stream gets the smaller score,
    hence the higher sparsity."""
    X = correlated_inputs(256, 32, seed=9)
    stats = {"a": stats_of(X)}
    W = {"a": torch.randn(16, 32, generator=torch.Generator().manual_seed(9))}
    schedule = HessianSchedule(SparsityPattern(sparsity=0.7), normalise="residual", levels=2)
    schedule.prepass_observe(0, stats, W, residual_energy=2.0)
    schedule.prepass_observe(1, stats, W, residual_energy=200.0)
    assert schedule.units[0].dense == pytest.approx(100.0 * schedule.units[1].dense, rel=1e-6)
    schedule.finish_prepass()
    assert schedule.plan.sparsities[0] < 0.7 < schedule.plan.sparsities[1]
    with pytest.raises(ValueError, match="residual energy of layer 0"):
        HessianSchedule(SparsityPattern(sparsity=0.7), normalise="residual").prepass_observe(0, stats, W)


def test_prepass_hands_each_layer_its_output_residual_energy():
    """The energy is the mean squared norm of the layer's output per token, position 0 left out."""
    model = deep_llama(layers=3)
    tokens = calib()
    seen = {}

    class Probe:
        name, prepass_statistics = "probe", "input_norms"

        def prepass_observe(self, index, norms, weights, residual_energy=None):
            seen[index] = residual_energy

        def finish_prepass(self, seconds):
            pass

    run_prepass(Probe(), model, tokens, options())
    with torch.no_grad():
        hidden = model(tokens, output_hidden_states=True).hidden_states
    for index in range(2):  # the last entry of hidden_states is after the final norm
        expected = hidden[index + 1][:, 1:].double().pow(2).sum(-1).mean().item()
        assert seen[index] == pytest.approx(expected, rel=1e-5)


def test_per_linear_granularity():
    model = deep_llama(layers=2)
    schedule = make_schedule("hessian", 0.7, granularity="linear", levels=4)
    result = prune_model(model, calib(), "sparsegpt", schedule, {}, options())
    units = schedule.describe()["units"]
    assert len(units) == len(result["records"]) == 14
    for u, r in zip(units, result["records"]):
        assert r["name"].endswith(u["name"]) and r["target_sparsity"] == u["sparsity"]
        assert r["achieved_sparsity"] == pytest.approx(u["sparsity"], abs=1e-3)
    assert weighted_mean([u["sparsity"] for u in units], [u["parameters"] for u in units]) == \
        pytest.approx(0.7, abs=1e-9)


def test_online_estimates_use_the_inputs_each_layer_really_sees():
    schedule = make_schedule("hessian", 0.7, levels=2)
    prune_model(deep_llama(), calib(), "sparsegpt", schedule, {}, options())
    units = schedule.describe()["units"]
    # layer 0 sees the same inputs in the dense pre-pass and in the pruning pass; later layers
    # see the outputs of pruned layers, which changes their estimates
    assert units[0]["estimate_real"] == pytest.approx(units[0]["estimate_dense"], rel=1e-5)
    for u in units[1:]:
        assert u["estimate_real"] != pytest.approx(u["estimate_dense"], rel=1e-3)


def test_offline_plan_uses_the_dense_estimates_only():
    schedule = make_schedule("hessian", 0.7, levels=3, online=False)
    prune_model(deep_llama(), calib(), "sparsegpt", schedule, {}, options())
    units = schedule.describe()["units"]
    assert all(u["estimate_real"] is None for u in units)
    errors = [u["estimate_dense"] for u in units]
    assert_allocation(errors, [u["parameters"] for u in units], [u["sparsity"] for u in units], 0.7, 0.6, 0.8)


def test_prepass_leaves_the_model_unchanged_and_sees_dense_statistics():
    model = deep_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    schedule = HessianSchedule(SparsityPattern(sparsity=0.7), levels=2)
    seconds = run_prepass(schedule, model, calib(), options())
    assert seconds > 0 and len(schedule.units) == 4
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    owl = OWLSchedule(SparsityPattern(sparsity=0.7))
    run_prepass(owl, model, calib(), options())
    assert all(0 < e["outlier_ratio"] < 1 for e in owl.layers)


@pytest.mark.parametrize("storage", ["cpu", "disk"])
def test_prepass_honours_the_activation_storage(tmp_path, storage):
    model = deep_llama()
    reference = HessianSchedule(SparsityPattern(sparsity=0.7), levels=3)
    run_prepass(reference, model, calib(), options())
    other = HessianSchedule(SparsityPattern(sparsity=0.7), levels=3)
    run_prepass(other, model, calib(), options(activations=storage, activations_dir=str(tmp_path)))
    assert [u.dense for u in other.units] == pytest.approx([u.dense for u in reference.units], rel=1e-5)
    assert other.plan.sparsities == pytest.approx(reference.plan.sparsities, abs=1e-12)
    assert not list(tmp_path.glob("**/*.bin"))  # disk buffers removed


@pytest.mark.parametrize("name", ["hessian", "owl"])
def test_resume_keeps_the_same_allocation(tmp_path, name):
    reference = deep_llama()
    ref_schedule = make_schedule(name, 0.7, levels=3)
    prune_model(reference, calib(), "sparsegpt", ref_schedule, {}, options())

    per_layer = len(prunable_linears(decoder_layers(reference)[0]))
    with sparsegpt_killed_after(2 * per_layer), pytest.raises(Killed):  # dies in layer 2
        prune_model(deep_llama(), calib(), "sparsegpt", make_schedule(name, 0.7, levels=3), {},
                    options(progress_dir=str(tmp_path / "p")))

    fresh, schedule = deep_llama(), make_schedule(name, 0.7, levels=3)
    result = prune_model(fresh, calib(), "sparsegpt", schedule, {},
                         options(progress_dir=str(tmp_path / "p"), resume=True))
    assert result["resumed_from"] == 2
    assert [u["sparsity"] for u in schedule.describe()["units"]] == \
        [u["sparsity"] for u in ref_schedule.describe()["units"]]
    for (k, a), (_, b) in zip(reference.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), k
    # another schedule configuration must not resume from this progress folder
    with pytest.raises(ValueError, match="different configuration"):
        prune_model(deep_llama(), calib(), "sparsegpt", make_schedule(name, 0.75, levels=2), {},
                    options(progress_dir=str(tmp_path / "p"), resume=True))


def test_nm_target_with_a_non_uniform_schedule_fails_before_any_work():
    with pytest.raises(ValueError, match="N:M"):
        HessianSchedule(SparsityPattern.parse("4:8"))


# -- the picture ---------------------------------------------------------------------------------

@pytest.mark.parametrize("normalise", NORMALISATIONS)
def test_plot_draws_a_png_from_a_report(tmp_path, normalise):
    from pyprune.plot import plot_report

    schedule = make_schedule("hessian", 0.7, levels=3, normalise=normalise)
    result = prune_model(tiny_model("llama"), calib(), "sparsegpt", schedule, {}, options())
    report = {"schedule": schedule.describe(), "linears": result["records"], "model": "tiny"}
    path = tmp_path / "r.json"
    path.write_text(json.dumps(report))
    out = plot_report(str(path))
    assert out == str(tmp_path / "r.png")
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    # a uniform run's report (no schedule units) still plots the achieved sparsity and losses
    uniform = {"schedule": {"schedule": "uniform", "target": "0.5"}, "linears": result["records"]}
    path2 = tmp_path / "u.json"
    path2.write_text(json.dumps(uniform))
    assert plot_report(str(path2), str(tmp_path / "u.png")).endswith("u.png")
