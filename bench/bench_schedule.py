"""Layer-wise sparsity schedules under protocol P1: uniform vs OWL vs the inverse-Hessian schedule.

P1: SmolLM2-135M (fp32), calibration = 32 C4 windows of 2048 tokens (seed 0), evaluation = the
first 40 WikiText-2 test windows of 2048 tokens; every Linear of the decoder layers is pruned.
Each configuration loads the dense model afresh, prunes it through ``prune_model`` (the same code
path as ``pyprune prune``) and measures perplexity. Reported per configuration: perplexity, the
achieved mean sparsity, the per-layer sparsities, the scheduler's own seconds (pre-pass,
estimates, allocation) and the pruning seconds.

Groups (``--group``):
  main    targets 0.7 and 0.75 x solvers sparsegpt, admm x schedules uniform, owl, hessian
          (hessian: 4 levels, range [0.6, 0.8], per decoder layer, online correction,
          residual normalisation)                                                      12 runs
  levels  hessian at 0.7 with 2, 3, 6, 8 levels, both solvers                            8 runs
  range   hessian at 0.7 with ranges [0.65, 0.75] and [0.5, 0.9], both solvers           4 runs
  variant hessian at 0.7 without online correction, per Linear, and with the other
          normalisations of the estimate (none, output), both solvers                        8 runs
  sink    sparsegpt at 0.7 with plain statistics (--sink-weight 1), uniform, owl, hessian      3 runs
On 2 CPU cores a configuration takes ~10 min (prune + 40 eval windows); on a GPU well under one.
Results accumulate in ``bench/results/schedule_p1.json`` (finished configurations are skipped
when the script is run again; ``--redo`` runs them again), a Markdown table in
``schedule_p1.md``, and each run's report and plot in ``bench/results/schedule_p1/``.

    python bench/bench_schedule.py --group main          # the comparison the README quotes
    python bench/bench_schedule.py --group all
    python bench/bench_schedule.py --only hessian-sparsegpt-0.7-L4-r0.6-0.8
    python bench/bench_schedule.py --quick --group levels --out schedule_quick
        # small proxy: 8 calibration windows of 512 tokens, 8 evaluation windows of 512

The equivalent CLI call of a configuration is written next to it (``cli`` field), once the
``--schedule`` flags are wired into ``pyprune prune``.
"""
import argparse
import json
import os
import sys
import time

import torch

from pyprune.pipeline.statistics import default_sink_weight
from pyprune.schedule import DEFAULT_NORMALISATION, NORMALISATIONS

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
DATA = os.environ.get("PYPRUNE_DATA_DIR", os.path.join(HERE, "..", "..", "shared", "data"))


NORMALISE_TAG = {"none": "", "output": "-outnorm", "residual": "-resnorm"}


def config(schedule, method, target, levels=4, lo=0.6, hi=0.8, granularity="layer", online=True,
           normalise=DEFAULT_NORMALISATION, sink=None):
    sink = default_sink_weight(method) if sink is None else float(sink)
    name = f"{schedule}-{method}-{target:g}"
    if schedule == "hessian":
        name += f"-L{levels}-r{lo:g}-{hi:g}" + ("" if granularity == "layer" else "-linear") + \
            ("" if online else "-offline") + NORMALISE_TAG[normalise]
    name += "" if sink == 1 else f"-sink{sink:g}"
    return {"name": name, "schedule": schedule, "method": method, "target": target, "levels": levels,
            "range": [lo, hi], "granularity": granularity, "online": online, "normalise": normalise,
            "sink_weight": sink}


def groups():
    solvers = ("sparsegpt", "admm")
    main = [config(s, m, t) for t in (0.7, 0.75) for m in solvers for s in ("uniform", "owl", "hessian")]
    levels = [config("hessian", m, 0.7, levels=k) for m in solvers for k in (2, 3, 6, 8)]
    ranges = [config("hessian", m, 0.7, lo=lo, hi=hi) for m in solvers for lo, hi in ((0.65, 0.75), (0.5, 0.9))]
    variant = [config("hessian", m, 0.7, online=False) for m in solvers] + \
        [config("hessian", m, 0.7, granularity="linear") for m in solvers] + \
        [config("hessian", m, 0.7, normalise=n) for m in solvers for n in NORMALISATIONS if n != DEFAULT_NORMALISATION]
    sink = [config(s, "sparsegpt", 0.7, sink=1) for s in ("uniform", "owl", "hessian")]
    return {"main": main, "levels": levels, "range": ranges, "variant": variant, "sink": sink,
            "all": main + levels + ranges + variant + sink}


def cli_command(cfg, args):
    cmd = (f"pyprune prune smollm2-135m --method {cfg['method']} --sparsity {cfg['target']:g} "
           f"--schedule {cfg['schedule']} --nsamples {args.nsamples} --seqlen {args.seqlen} "
           f"--eval-windows {args.eval_windows} --eval-seqlen {args.eval_seqlen} --data-dir {args.data_dir} "
           f"--dtype float32 --sink-weight {cfg.get('sink_weight', 1.0):g} --no-sink-cap")
    if cfg["schedule"] == "hessian":
        cmd += (f" --levels {cfg['levels']} --sparsity-range {cfg['range'][0]:g} {cfg['range'][1]:g}"
                f" --schedule-granularity {cfg['granularity']} --schedule-normalise {cfg['normalise']}")
    return cmd + f" --report bench/results/schedule_p1/{cfg['name']}.json"


def run_one(cfg, args, device):
    from pyprune.data import calibration_tokens, evaluation_tokens
    from pyprune.eval import perplexity
    from pyprune.models import load_model
    from pyprune.pipeline import RunOptions, prune_model
    from pyprune.pipeline.report import totals
    from pyprune.plot import per_layer
    from pyprune.schedule import make_schedule

    schedule = make_schedule(cfg["schedule"], cfg["target"], sparsity_range=tuple(cfg["range"]),
                             levels=cfg["levels"], granularity=cfg["granularity"], online=cfg["online"],
                             normalise=cfg.get("normalise", "none"))
    model, tokenizer = load_model("smollm2-135m", torch.float32)
    tokens = calibration_tokens(tokenizer, "c4", args.nsamples, args.seqlen, 0, args.data_dir)
    solver_options = {"damp": 0.01, "blocksize": 128} if cfg["method"] == "sparsegpt" else {}
    t0 = time.time()
    progress = os.path.join(args.progress_dir, cfg["name"]) if args.progress_dir else None
    run = prune_model(model, tokens, cfg["method"], schedule, solver_options,
                      RunOptions(device=device, show_progress=not args.quiet, progress_dir=progress,
                                 resume=progress is not None, sink_weight=cfg.get("sink_weight", 1.0)))
    prune_seconds = time.time() - t0
    model.to(device)
    ppl = perplexity(model, evaluation_tokens(tokenizer, args.data_dir), args.eval_seqlen, args.eval_windows,
                     device, progress=not args.quiet)
    model.to("cpu")
    described = schedule.describe()
    layers = per_layer(run["records"])
    t = totals(run["records"])
    return {
        **cfg,
        "ppl": ppl["ppl"],
        "achieved_sparsity": t["achieved_sparsity"],
        "loss_sum": t["loss_sum"],
        "layer_sparsity": [round(v["sparsity"], 5) for v in layers.values()],
        "layer_loss": [v["loss"] for v in layers.values()],
        "scheduler_seconds": described.get("seconds"),
        "prune_seconds": prune_seconds,
        "eval_seconds": ppl["seconds"],
        "cli": cli_command(cfg, args),
    }, {"model": "smollm2-135m", "schedule": described, "linears": run["records"],
        "totals": dict(t, ppl=ppl["ppl"], pruning_seconds=prune_seconds)}


def table(results):
    rows = ["| configuration | schedule | solver | target | levels | range | normalise | sink | ppl | achieved | "
            "loss sum | scheduler s | prune s |", "|" + "---|" * 13]
    for r in results:
        sched = (r.get("scheduler_seconds") or {}).get("total", 0.0)
        rows.append(
            f"| {r['name']} | {r['schedule']} | {r['method']} | {r['target']:g} | "
            f"{r['levels'] if r['schedule'] == 'hessian' else '-'} | "
            f"{'[%g, %g]' % tuple(r['range']) if r['schedule'] == 'hessian' else '-'} | "
            f"{r.get('normalise', 'none') if r['schedule'] == 'hessian' else '-'} | {r.get('sink_weight', 1.0):g} | "
            f"{r['ppl']:.3f} | "
            f"{r['achieved_sparsity']:.4f} | {r['loss_sum']:.4g} | {sched:.1f} | {r['prune_seconds']:.0f} |")
    return "\n".join(rows)


class _EstimateProbe:
    """A pre-pass consumer that keeps both estimates (undamped, damped) of every layer."""

    prepass_statistics = "hessian"
    name = "probe"

    def __init__(self, target):
        self.target, self.rows = target, []

    def prepass_observe(self, index, stats, weights, residual_energy=None):
        from pyprune.schedule.estimate import estimate_linears_both

        t0 = time.time()
        undamped, damped = estimate_linears_both(weights, stats, [self.target])
        self.rows.append({"layer": index, "undamped": sum(v[0] for v in undamped.values()),
                          "damped": sum(v[0] for v in damped.values()), "residual_energy": residual_energy,
                          "seconds": time.time() - t0})

    def finish_prepass(self, seconds):
        self.seconds = seconds


def spearman(a, b):
    def ranks(x):
        order = sorted(range(len(x)), key=lambda i: x[i])
        r = [0] * len(x)
        for k, i in enumerate(order):
            r[i] = k
        return r
    ra, rb, m = ranks(a), ranks(b), (len(a) - 1) / 2
    return sum((x - m) * (y - m) for x, y in zip(ra, rb)) / sum((x - m) ** 2 for x in ra)


def estimates(args, device):
    """Dense OBS estimates (undamped and damped) of every layer at the target, against the actual
    per-layer SparseGPT losses of a uniform run's report (``--against``)."""
    from pyprune.data import calibration_tokens
    from pyprune.models import load_model
    from pyprune.pipeline import RunOptions
    from pyprune.pipeline.prepass import run_prepass
    from pyprune.plot import per_layer

    model, tokenizer = load_model("smollm2-135m", torch.float32)
    tokens = calibration_tokens(tokenizer, "c4", args.nsamples, args.seqlen, 0, args.data_dir)
    probe = _EstimateProbe(args.target)
    run_prepass(probe, model, tokens, RunOptions(device=device, show_progress=not args.quiet))
    out = {"protocol": {"nsamples": args.nsamples, "seqlen": args.seqlen, "target": args.target},
           "prepass_seconds": probe.seconds, "layers": probe.rows}
    lines = ["| layer | estimate (undamped) | estimate (damped) |" + (" actual loss |" if args.against else ""),
             "|---|---|---|" + ("---|" if args.against else "")]
    actual = None
    if args.against:
        with open(args.against) as f:
            actual = [v["loss"] for v in per_layer(json.load(f)["linears"]).values()]
        for key in ("undamped", "damped"):
            out[f"spearman_{key}"] = spearman([r[key] for r in probe.rows], actual)
        out["against"] = args.against
    for i, r in enumerate(probe.rows):
        lines.append(f"| {r['layer']} | {r['undamped']:.4g} | {r['damped']:.4g} |" +
                     (f" {actual[i]:.4g} |" if actual else ""))
    name = os.path.join(RESULTS, args.out + "_estimates")
    with open(name + ".json", "w") as f:
        json.dump(out, f, indent=1)
    with open(name + ".md", "w") as f:
        f.write(f"# Dense OBS estimates per layer at sparsity {args.target:g}\n\n" +
                (f"Spearman vs actual loss: undamped {out['spearman_undamped']:.3f}, "
                 f"damped {out['spearman_damped']:.3f}\n\n" if actual else "") + "\n".join(lines) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k != "layers"}))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--group", default="main", choices=sorted(groups()))
    p.add_argument("--only", nargs="*", default=None, help="configuration names (see --list)")
    p.add_argument("--list", action="store_true")
    p.add_argument("--quick", action="store_true", help="8x512 calibration, 8x512 evaluation (a proxy, not P1)")
    p.add_argument("--nsamples", type=int, default=None, help="calibration windows (P1: 32; quick: 8)")
    p.add_argument("--seqlen", type=int, default=None, help="calibration window length (P1: 2048; quick: 512)")
    p.add_argument("--eval-windows", type=int, default=None, help="evaluation windows (P1: 40; quick: 8)")
    p.add_argument("--eval-seqlen", type=int, default=None, help="evaluation window length (P1: 2048; quick: 512)")
    p.add_argument("--progress-dir", default=None,
                   help="save per-layer progress here and resume a killed configuration from it")
    p.add_argument("--data-dir", default=os.path.abspath(DATA))
    p.add_argument("--device", default=None)
    p.add_argument("--out", default="schedule_p1", help="result name under bench/results/")
    p.add_argument("--redo", action="store_true", help="run configurations already in the results again")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--estimates", action="store_true",
                   help="only the dense per-layer estimates (undamped and damped), no pruning")
    p.add_argument("--target", type=float, default=0.7, help="--estimates: candidate sparsity")
    p.add_argument("--against", default=None, help="--estimates: a uniform run's report to compare with")
    args = p.parse_args(argv)
    defaults = (8, 512, 8, 512) if args.quick else (32, 2048, 40, 2048)
    for key, value in zip(("nsamples", "seqlen", "eval_windows", "eval_seqlen"), defaults):
        if getattr(args, key) is None:
            setattr(args, key, value)
    everything = {c["name"]: c for c in groups()["all"]}
    if args.list:
        print("\n".join(everything))
        return 0
    if args.only:
        unknown = [n for n in args.only if n not in everything]
        if unknown:
            raise SystemExit(f"unknown configuration(s) {unknown}; see --list")
        todo = [everything[n] for n in args.only]
    else:
        todo = groups()[args.group]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.estimates:
        estimates(args, device)
        return 0

    path = os.path.join(RESULTS, args.out + ".json")
    folder = os.path.join(RESULTS, args.out)
    os.makedirs(folder, exist_ok=True)
    saved = json.load(open(path)) if os.path.isfile(path) else {"runs": []}
    protocol = {"nsamples": args.nsamples, "seqlen": args.seqlen, "eval_windows": args.eval_windows,
                "eval_seqlen": args.eval_seqlen, "device": device, "torch": torch.__version__,
                "threads": torch.get_num_threads()}
    if saved.get("protocol", protocol) != protocol:
        saved["runs"] = [r for r in saved["runs"] if r.get("protocol") == protocol]
    done = {r["name"] for r in saved["runs"]}
    for cfg in todo:
        if cfg["name"] in done and not args.redo:
            print(f"skip {cfg['name']} (done)")
            continue
        print(f"run {cfg['name']}", flush=True)
        result, report = run_one(cfg, args, device)
        result["protocol"] = protocol
        if os.path.isfile(path):  # another process may have added runs meanwhile: keep them
            on_disk = json.load(open(path))
            if on_disk.get("protocol") == protocol:
                saved["runs"] = on_disk["runs"]
        saved["runs"] = [r for r in saved["runs"] if r["name"] != cfg["name"]] + [result]
        saved["protocol"] = protocol
        with open(os.path.join(folder, cfg["name"] + ".json"), "w") as f:
            json.dump(report, f, indent=1, default=str)
        try:
            from pyprune.plot import plot_report

            plot_report(os.path.join(folder, cfg["name"] + ".json"))
        except Exception as exc:  # a missing matplotlib must not lose a finished run
            print(f"plot failed: {exc}", file=sys.stderr)
        with open(path, "w") as f:
            json.dump(saved, f, indent=1)
        with open(os.path.join(RESULTS, args.out + ".md"), "w") as f:
            f.write(f"# Sparsity schedules, {args.out}\n\nProtocol: {json.dumps(protocol)}\n\n"
                    + table(saved["runs"]) + "\n")
        print(json.dumps({k: result[k] for k in ("name", "ppl", "achieved_sparsity", "prune_seconds")}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
