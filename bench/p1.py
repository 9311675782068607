"""Protocol P1 (DESIGN.md) on smollm2-135m: calibration = 32 C4 windows of 2048 tokens
(random.seed(0) offsets), evaluation = first 40 WikiText-2 test windows of 2048 tokens, fp32.

    python bench/p1.py run NAME [--data-dir D]   # one configuration from CONFIGS (or extra CLI flags)
    python bench/p1.py table                      # bench/results/p1.md from every result JSON

Configurations named without "sink" pin --sink-weight 1 (plain statistics, as measured before the
option existed); the "-sink256" ones use 256 (the CLI's default for sparsegpt and GPTQ).
The "-self" ones replace the C4 calibration by 32 x 2048 tokens sampled from the dense model
(seed 0, the CLI's sampling defaults, batches of 32): the first such run generates them and saves
them to bench/results/p1/self_calib_32x2048_seed0.safetensors (not versioned; its header records the
generation time), later runs reuse that file.
Each run writes bench/results/p1/NAME.json: the pyprune report plus wall time and peak RSS.
"""
import argparse
import glob
import json
import os
import resource
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "p1")
DEFAULT_DATA = os.path.join(HERE, "..", "..", "shared", "data")

COMMON = ["--nsamples", "32", "--seqlen", "2048", "--seed", "0", "--calib", "c4",
          "--eval-windows", "40", "--eval-seqlen", "2048", "--dtype", "float32", "--quiet"]

SELF_CALIB = os.path.join(RESULTS, "self_calib_32x2048_seed0.safetensors")
SELF = "<self-calibration>"  # stands for the flags that generate or reuse SELF_CALIB

CONFIGS = {
    "magnitude-50": ["--method", "magnitude", "--sparsity", "0.5"],
    "wanda-50": ["--method", "wanda", "--sparsity", "0.5"],
    "sparsegpt-50": ["--method", "sparsegpt", "--sparsity", "0.5", "--sink-weight", "1"],
    "wanda-2of4": ["--method", "wanda", "--pattern", "2:4"],
    "sparsegpt-2of4": ["--method", "sparsegpt", "--pattern", "2:4", "--sink-weight", "1"],
    "sparsegpt-4of8": ["--method", "sparsegpt", "--pattern", "4:8", "--sink-weight", "1"],
    "sparsegpt-60": ["--method", "sparsegpt", "--sparsity", "0.6", "--sink-weight", "1"],
    "sparsegpt-70": ["--method", "sparsegpt", "--sparsity", "0.7", "--sink-weight", "1"],
    "sparsegpt-80": ["--method", "sparsegpt", "--sparsity", "0.8", "--sink-weight", "1"],
    "admm-grad-60": ["--method", "admm", "--sparsity", "0.6", "--sink-weight", "1"],
    "admm-grad-70": ["--method", "admm", "--sparsity", "0.7", "--sink-weight", "1"],
    "admm-grad-80": ["--method", "admm", "--sparsity", "0.8", "--sink-weight", "1"],
    "admm-grad-2of4": ["--method", "admm", "--pattern", "2:4", "--sink-weight", "1"],
    "admm1-70": ["--method", "admm", "--sparsity", "0.7", "--mask", "wanda", "--sink-weight", "1"],
    "admm-grad-70-nofinal": ["--method", "admm", "--sparsity", "0.7", "--no-final-solve", "--sink-weight", "1"],
    "sparsegpt-70-owl": ["--method", "sparsegpt", "--sparsity", "0.7", "--schedule", "owl", "--sink-weight", "1"],
    "sparsegpt-70-hessian": ["--method", "sparsegpt", "--sparsity", "0.7", "--schedule", "hessian", "--sink-weight", "1"],
    "gptq-int4-g64": ["--method", "none", "--wbits", "4", "--groupsize", "64", "--sink-weight", "1"],
    "rtn-int4-g64": ["--method", "none", "--wbits", "4", "--groupsize", "64", "--quant-method", "rtn"],
    "sparsegpt-50-int4-g64": ["--method", "sparsegpt", "--sparsity", "0.5", "--wbits", "4", "--groupsize", "64",
                              "--sink-weight", "1"],
    "sparsegpt-2of4-int4-g64": ["--method", "sparsegpt", "--pattern", "2:4", "--wbits", "4", "--groupsize", "64",
                                "--sink-weight", "1"],
    "sparsegpt-50-sink256": ["--method", "sparsegpt", "--sparsity", "0.5", "--sink-weight", "256"],
    "gptq-int4-g64-sink256": ["--method", "none", "--wbits", "4", "--groupsize", "64", "--sink-weight", "256"],
    "sparsegpt-50-int4-g64-sink256": ["--method", "sparsegpt", "--sparsity", "0.5", "--wbits", "4", "--groupsize", "64",
                                      "--sink-weight", "256"],
    "sparsegpt-2of4-sink256": ["--method", "sparsegpt", "--pattern", "2:4", "--sink-weight", "256"],
    "sparsegpt-2of4-int4-g64-sink256": ["--method", "sparsegpt", "--pattern", "2:4", "--wbits", "4", "--groupsize", "64",
                                        "--sink-weight", "256"],
    "admm-grad-70-sink256": ["--method", "admm", "--sparsity", "0.7", "--sink-weight", "256"],
    "admm-grad-70-int4-g64-sink256": ["--method", "admm", "--sparsity", "0.7", "--wbits", "4", "--groupsize", "64",
                                      "--sink-weight", "256"],
    "admm-grad-70-int4-g64": ["--method", "admm", "--sparsity", "0.7", "--wbits", "4", "--groupsize", "64",
                              "--sink-weight", "1"],
    "sparsegpt-50-sink256-self": ["--method", "sparsegpt", "--sparsity", "0.5", "--sink-weight", "256", SELF],
    "sparsegpt-50-self": ["--method", "sparsegpt", "--sparsity", "0.5", "--sink-weight", "1", SELF],
    "sparsegpt-2of4-self": ["--method", "sparsegpt", "--pattern", "2:4", "--sink-weight", "1", SELF],
    "admm-grad-70-self": ["--method", "admm", "--sparsity", "0.7", "--sink-weight", "1", SELF],
}


def calibration_flags(flags):
    """Expand SELF into a generating or a reusing calibration flag set."""
    if SELF not in flags:
        return flags
    rest = [f for f in flags if f != SELF]
    if os.path.exists(SELF_CALIB):
        return rest + ["--calib", SELF_CALIB]
    return rest + ["--calib", "self", "--calib-batch-size", "32", "--save-calib", SELF_CALIB]


def run(name, data_dir, extra):
    from pyprune.cli import build_parser, cmd_eval, cmd_prune

    os.makedirs(RESULTS, exist_ok=True)
    start = time.time()
    if name == "dense":
        args = build_parser().parse_args(["eval", "smollm2-135m", "--data-dir", data_dir, "--max-windows", "40",
                                          "--eval-seqlen", "2048", "--dtype", "float32", "--quiet"])
        report = cmd_eval(args)
        report["totals"] = {"ppl": report["eval"]["ppl"], "eval_seconds": report["eval"]["seconds"],
                            "achieved_sparsity": 0.0, "pruning_seconds": 0.0}
    else:
        flags = calibration_flags(CONFIGS.get(name, [])) + extra
        if not flags:
            raise SystemExit(f"unknown configuration {name!r}; known: dense, {', '.join(CONFIGS)}")
        # The configuration's flags come last, so they override COMMON (e.g. --calib).
        args = build_parser().parse_args(["prune", "smollm2-135m", *COMMON, "--data-dir", data_dir, *flags])
        report = cmd_prune(args)
    report["bench"] = {
        "name": name,
        "protocol": "P1",
        "wall_seconds": time.time() - start,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": os.environ.get("OMP_NUM_THREADS", "default"),
        "machine": f"{os.cpu_count()} CPU cores, no GPU",
    }
    with open(os.path.join(RESULTS, f"{name}.json"), "w") as f:
        json.dump(report, f, indent=1, default=str)
    print(json.dumps({"name": name, "ppl": report["totals"].get("ppl"), **report["bench"]}))


def table():
    rows = []
    for path in sorted(glob.glob(os.path.join(RESULTS, "*.json"))):
        with open(path) as f:
            r = json.load(f)
        t, b = r["totals"], r["bench"]
        q = r.get("quantization") or {}
        sink = (r.get("config") or {}).get("sink_weight") or 1  # reports from before the option: plain statistics
        calib = (r.get("calibration") or {}).get("source", "c4")
        rows.append((b["name"], t.get("ppl"), t.get("achieved_sparsity", 0.0), q.get("bits_per_weight"), sink, calib,
                     t.get("pruning_seconds", 0.0), t.get("eval_seconds"), b["peak_rss_mib"], b["threads"]))
    lines = ["# Protocol P1 on smollm2-135m (fp32, CPU)", "",
             "Calibration 32 x 2048 tokens (seed 0): C4, or 'self' (sampled from the dense model); "
             "WikiText-2 test, first 40 windows of 2048 tokens.",
             "Timings were taken on a shared 2-core machine; threads 1 = two runs in parallel, 'default' = alone: compare loosely.", "",
             "'sink' = --sink-weight (the first token of each window counted as that many tokens in the statistics).", "",
             "| configuration | ppl | sparsity | bits/weight | sink | calibration | prune s | eval s | peak RSS MiB "
             "| threads |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, ppl, sp, bits, sink, calib, ps, es, rss, th in rows:
        lines.append(f"| {name} | {ppl:.2f} | {sp:.3f} | {'' if bits is None else f'{bits:.3f}'} | {sink:g} | {calib} "
                     f"| {ps:.0f} | {es or 0:.0f} | {rss:.0f} | {th} |")
    with open(os.path.join(HERE, "results", "p1.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("name")
    r.add_argument("--data-dir", default=os.environ.get("PYPRUNE_DATA_DIR", DEFAULT_DATA))
    sub.add_parser("table")
    args, extra = p.parse_known_args()
    if args.cmd == "run":
        run(args.name, os.path.abspath(args.data_dir), extra)
    else:
        table()


if __name__ == "__main__":
    sys.exit(main())
