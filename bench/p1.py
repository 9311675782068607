"""Protocol P1 (DESIGN.md) on smollm2-135m: calibration = 32 C4 windows of 2048 tokens
(random.seed(0) offsets), evaluation = first 40 WikiText-2 test windows of 2048 tokens, fp32.

    python bench/p1.py [--results DIR] run NAME... [--data-dir D] [--budget S] [extra CLI flags]
    python bench/p1.py [--results DIR] table      # DIR.md (default bench/results/p1.md) from its JSONs
    python bench/p1.py [--results DIR] grid       # DIR_grid.md: the method x sparsity grid

Configurations named without "sink" pin --sink-weight 1 (plain statistics, as measured before the
option existed); the "-sink256" ones use 256 (the CLI's default for sparsegpt and GPTQ). Those named
"-cap" cap the first token (--sink-cap, the CLI's default above sink weight 1); the others pin --no-sink-cap.
The "-self" ones replace the C4 calibration by 32 x 2048 tokens sampled from the dense model
(seed 0, temperature 1.0, top-p 0.95, batches of 32, one 2048-token sample per window);
"-selfeot" starts each row with <|endoftext|> instead of the tokenizer's BOS, "-selfeot-t08" also samples at temperature 0.8, and
"-self512" / "-self256" fill each window with independent samples of 512 / 256 tokens
("-self512-topp1": 512, sampled without the top-p cut; "-self128-topp1" / "-self2048-topp1": the
same with 128 / 2048 tokens, 128 being the CLI's default; "-self512-t11" / "-t12": 512 without the
cut at temperature 1.1 / 1.2). "-act" INT4 configurations run GPTQ in act-order. The first
run of a variant generates its tokens into DIR/self_calib_32x2048_seed0[_VARIANT].safetensors (not
versioned; its header records the generation time), later runs reuse that file.
Each run writes DIR/NAME.json: the pyprune report plus wall time, peak RSS (and peak GPU memory).
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

# Self-calibration variants: the generation flags of each. A configuration names one with SELF + variant.
SELF = "<self-calibration>"
SELF_VARIANTS = {
    # "self" and "selfeot*" ran with one sample per window, the default before 512-token samples;
    # all but "-topp1" ran with top-p 0.95, the default before 1.0.
    "self": ["--calib-sample-len", "2048", "--calib-top-p", "0.95"],
    "selfeot": ["--calib-sample-len", "2048", "--calib-top-p", "0.95",
                "--calib-prefix", "<|endoftext|>"],  # rows start as new documents
    "selfeot-t08": ["--calib-sample-len", "2048", "--calib-top-p", "0.95", "--calib-prefix", "<|endoftext|>",
                    "--calib-temperature", "0.8"],
    "self512": ["--calib-sample-len", "512", "--calib-top-p", "0.95"],  # four independent 512-token samples per window
    "self256": ["--calib-sample-len", "256", "--calib-top-p", "0.95"],
    "self512-topp1": ["--calib-sample-len", "512", "--calib-top-p", "1.0"],  # the untruncated distribution
    # Untruncated, hotter or with other sample lengths: does more diverse text calibrate better?
    "self512-t11": ["--calib-sample-len", "512", "--calib-top-p", "1.0", "--calib-temperature", "1.1"],
    "self512-t12": ["--calib-sample-len", "512", "--calib-top-p", "1.0", "--calib-temperature", "1.2"],
    "self128-topp1": ["--calib-sample-len", "128", "--calib-top-p", "1.0"],  # the CLI's default
    "self2048-topp1": ["--calib-sample-len", "2048", "--calib-top-p", "1.0"],
}

# The method x sparsity grid (ADMM issue): every name METHOD-POINT, e.g. admm-grad-70, admm1-2of4-nofinal.
POINTS = {"50": ["--sparsity", "0.5"], "60": ["--sparsity", "0.6"], "70": ["--sparsity", "0.7"],
          "80": ["--sparsity", "0.8"], "2of4": ["--pattern", "2:4"], "4of8": ["--pattern", "4:8"]}
GRID_METHODS = {
    "magnitude": ["--method", "magnitude"],
    "wanda": ["--method", "wanda"],
    "sparsegpt": ["--method", "sparsegpt", "--sink-weight", "1"],
    "admm1": ["--method", "admm", "--mask", "wanda", "--sink-weight", "1"],
    "admm-grad": ["--method", "admm", "--sink-weight", "1"],
}
ADMM_SUFFIXES = {"": [], "-nofinal": ["--no-final-solve"]}

CONFIGS = {}
for _method, _mflags in GRID_METHODS.items():
    for _point, _pflags in POINTS.items():
        for _suffix, _sflags in (ADMM_SUFFIXES.items() if _method.startswith("admm") else [("", [])]):
            CONFIGS[f"{_method}-{_point}{_suffix}"] = _mflags + _pflags + _sflags
for _point in ("60", "70", "80"):  # the published re-selection (every step at the final sparsity) vs the schedule
    CONFIGS[f"admm-grad-{_point}-schedule"] = (GRID_METHODS["admm-grad"] + POINTS[_point]
                                               + ["--admm-reselect", "schedule"])

CONFIGS.update({
    "sparsegpt-70-owl": ["--method", "sparsegpt", "--sparsity", "0.7", "--schedule", "owl", "--sink-weight", "1"],
    "sparsegpt-70-hessian": ["--method", "sparsegpt", "--sparsity", "0.7", "--schedule", "hessian", "--sink-weight", "1"],
    "gptq-int4-g64": ["--method", "none", "--wbits", "4", "--groupsize", "64", "--sink-weight", "1"],
    "rtn-int4-g64": ["--method", "none", "--wbits", "4", "--groupsize", "64", "--quant-method", "rtn"],
    "gptq-int4-g128": ["--method", "none", "--wbits", "4", "--groupsize", "128", "--sink-weight", "1"],
    "rtn-int4-g128": ["--method", "none", "--wbits", "4", "--groupsize", "128", "--quant-method", "rtn"],
    "sparsegpt-50-int4-g64": ["--method", "sparsegpt", "--sparsity", "0.5", "--wbits", "4", "--groupsize", "64",
                              "--sink-weight", "1"],
    "sparsegpt-2of4-int4-g64": ["--method", "sparsegpt", "--pattern", "2:4", "--wbits", "4", "--groupsize", "64",
                                "--sink-weight", "1"],
    "sparsegpt-50-sink256": ["--method", "sparsegpt", "--sparsity", "0.5", "--sink-weight", "256"],
    "gptq-int4-g64-sink256": ["--method", "none", "--wbits", "4", "--groupsize", "64", "--sink-weight", "256"],
    "gptq-int4-g128-sink256": ["--method", "none", "--wbits", "4", "--groupsize", "128", "--sink-weight", "256"],
    "sparsegpt-50-int4-g64-sink256": ["--method", "sparsegpt", "--sparsity", "0.5", "--wbits", "4", "--groupsize", "64",
                                      "--sink-weight", "256"],
    "sparsegpt-50-int4-g128-sink256": ["--method", "sparsegpt", "--sparsity", "0.5", "--wbits", "4",
                                       "--groupsize", "128", "--sink-weight", "256"],
    "sparsegpt-2of4-sink256": ["--method", "sparsegpt", "--pattern", "2:4", "--sink-weight", "256"],
    "sparsegpt-2of4-int4-g64-sink256": ["--method", "sparsegpt", "--pattern", "2:4", "--wbits", "4", "--groupsize", "64",
                                        "--sink-weight", "256"],
    "sparsegpt-2of4-int4-g128-sink256": ["--method", "sparsegpt", "--pattern", "2:4", "--wbits", "4",
                                         "--groupsize", "128", "--sink-weight", "256"],
    "admm-grad-50-sink256": ["--method", "admm", "--sparsity", "0.5", "--sink-weight", "256"],
    "admm-grad-2of4-sink256": ["--method", "admm", "--pattern", "2:4", "--sink-weight", "256"],
    "admm-grad-50-int4-g64-sink256": ["--method", "admm", "--sparsity", "0.5", "--wbits", "4", "--groupsize", "64",
                                      "--sink-weight", "256"],
    "admm-grad-2of4-int4-g64-sink256": ["--method", "admm", "--pattern", "2:4", "--wbits", "4", "--groupsize", "64",
                                        "--sink-weight", "256"],
    "admm-grad-70-sink256": ["--method", "admm", "--sparsity", "0.7", "--sink-weight", "256"],
    "admm-grad-70-int4-g64-sink256": ["--method", "admm", "--sparsity", "0.7", "--wbits", "4", "--groupsize", "64",
                                      "--sink-weight", "256"],
    "admm-grad-70-int4-g64": ["--method", "admm", "--sparsity", "0.7", "--wbits", "4", "--groupsize", "64",
                              "--sink-weight", "1"],
    "admm-grad-70-hessian": ["--method", "admm", "--sparsity", "0.7", "--schedule", "hessian", "--sink-weight", "1"],
    "admm-grad-70-hessian-int4-g64": ["--method", "admm", "--sparsity", "0.7", "--schedule", "hessian",
                                      "--wbits", "4", "--groupsize", "64", "--sink-weight", "1"],
})
for _variant in SELF_VARIANTS:
    CONFIGS.update({
        f"sparsegpt-50-sink256-{_variant}": ["--method", "sparsegpt", "--sparsity", "0.5", "--sink-weight", "256",
                                             SELF + _variant],
        f"sparsegpt-50-{_variant}": ["--method", "sparsegpt", "--sparsity", "0.5", "--sink-weight", "1", SELF + _variant],
        f"sparsegpt-2of4-{_variant}": ["--method", "sparsegpt", "--pattern", "2:4", "--sink-weight", "1",
                                       SELF + _variant],
        f"sparsegpt-2of4-sink256-{_variant}": ["--method", "sparsegpt", "--pattern", "2:4", "--sink-weight", "256",
                                               SELF + _variant],
        f"admm-grad-70-{_variant}": ["--method", "admm", "--sparsity", "0.7", "--sink-weight", "1", SELF + _variant],
        f"admm-grad-70-hessian-{_variant}": ["--method", "admm", "--sparsity", "0.7", "--schedule", "hessian",
                                             "--sink-weight", "1", SELF + _variant],
    })

# "-mse": the same INT4 configuration with scales fitted by the mse search instead of min-max.
for _name, _flags in list(CONFIGS.items()):
    if "--wbits" in _flags:
        CONFIGS[_name + "-mse"] = _flags + ["--scale-fit", "mse"]

# "-act": GPTQ in act-order with static groups; with a pruning method this is prune first, then a
# mask-preserving GPTQ (the joint one-sweep SparseGPT + INT4 has no act-order).
for _name in ("gptq-int4-g64-sink256", "sparsegpt-50-int4-g64-sink256", "sparsegpt-2of4-int4-g64-sink256",
              "admm-grad-70-hessian-int4-g64", "admm-grad-2of4-int4-g64-sink256", "admm-grad-50-int4-g64-sink256"):
    for _suffix in ("", "-mse"):
        CONFIGS[_name + "-act" + _suffix] = CONFIGS[_name + _suffix] + ["--act-order"]

# "-refine": 4 rounds of code and scale refinement after the INT4 sweep (pyprune.ops.int4_refine),
# after act-order GPTQ ("-act-refine") or after the joint SparseGPT + INT4 sweep ("sparsegpt-...-refine").
for _name in ("gptq-int4-g64-sink256", "sparsegpt-50-int4-g64-sink256", "sparsegpt-2of4-int4-g64-sink256",
              "admm-grad-2of4-int4-g64-sink256", "admm-grad-50-int4-g64-sink256", "admm-grad-70-hessian-int4-g64"):
    CONFIGS[_name + "-act-refine"] = CONFIGS[_name + "-act"] + ["--refine-rounds", "4"]
for _name in ("sparsegpt-50-int4-g64-sink256", "sparsegpt-2of4-int4-g64-sink256"):
    CONFIGS[_name + "-refine"] = CONFIGS[_name] + ["--no-act-order", "--refine-rounds", "4"]
    CONFIGS[_name + "-refine8"] = CONFIGS[_name] + ["--no-act-order", "--refine-rounds", "8"]
    CONFIGS[_name + "-refine-mse"] = CONFIGS[_name + "-refine"] + ["--scale-fit", "mse"]

# "-original": the refinement after the pruning solver aims at the weight before pruning.
for _name in ("sparsegpt-50-int4-g64-sink256", "sparsegpt-2of4-int4-g64-sink256", "admm-grad-50-int4-g64-sink256"):
    CONFIGS[_name + "-act-refine-original"] = CONFIGS[_name + "-act-refine"] + ["--refine-target", "original"]

# "-final": SparseGPT finished by the exact solve on its mask (with INT4: then act-order GPTQ).
CONFIGS["sparsegpt-50-sink256-final"] = CONFIGS["sparsegpt-50-sink256"] + ["--final-solve"]
CONFIGS["sparsegpt-2of4-sink256-final"] = CONFIGS["sparsegpt-2of4-sink256"] + ["--final-solve"]
CONFIGS["sparsegpt-50-int4-g64-sink256-final-act-refine-original"] = (
    CONFIGS["sparsegpt-50-int4-g64-sink256-act-refine-original"] + ["--final-solve"])

# "-seq": --true-sequential (each group of a layer's Linears calibrated after the groups before it).
for _name in ("sparsegpt-50-sink256", "sparsegpt-50-int4-g64-sink256-act-refine-original",
              "sparsegpt-50-int4-g64-sink256-refine", "gptq-int4-g64-sink256-act-refine"):
    CONFIGS[_name + "-seq"] = CONFIGS[_name] + ["--true-sequential"]

# "-qdampF": GPTQ after pruning (and its refinement) dampened by F x mean diag(H) instead of 0.01.
for _damp in ("0.1", "0.3"):
    CONFIGS["sparsegpt-50-int4-g64-sink256-act-refine-original-qdamp" + _damp] = (
        CONFIGS["sparsegpt-50-int4-g64-sink256-act-refine-original"] + ["--quant-damp", _damp])

# "-cap": --sink-cap (the first token's input row shrunk to its window's median row length first).
for _name in ("sparsegpt-50-sink256", "sparsegpt-50-int4-g64-sink256-act-refine-original",
              "gptq-int4-g64-sink256-act-refine", "sparsegpt-50-int4-g64-sink256-refine",
              "sparsegpt-2of4-sink256", "sparsegpt-2of4-int4-g64-sink256-refine"):
    CONFIGS[_name + "-cap"] = CONFIGS[_name] + ["--sink-cap"]
CONFIGS["sparsegpt-50-int4-g64-sink256-refine8-cap"] = CONFIGS["sparsegpt-50-int4-g64-sink256-refine8"] + ["--sink-cap"]
CONFIGS["sparsegpt-50-int4-g64-sink256-refine-cap-seq"] = (CONFIGS["sparsegpt-50-int4-g64-sink256-refine-cap"]
                                                          + ["--true-sequential"])

# "-cap-qdampF": the capped act-order path with less GPTQ dampening (0.1 and 0.3 were worse than 0.01).
for _damp in ("0.001", "0.003"):
    CONFIGS["sparsegpt-50-int4-g64-sink256-act-refine-original-cap-qdamp" + _damp] = (
        CONFIGS["sparsegpt-50-int4-g64-sink256-act-refine-original-cap"] + ["--quant-damp", _damp])

# "-seed1": the best 50 % + INT4 configuration and its 50 % counterpart on other calibration windows
# (random.seed(1) offsets), to see how much the INT4 cost moves with the calibration sample.
for _name in ("sparsegpt-50-sink256-cap", "sparsegpt-50-int4-g64-sink256-refine-cap"):
    CONFIGS[_name + "-seed1"] = CONFIGS[_name] + ["--seed", "1"]

# "-tuneN": after each layer is quantized, its group scales tuned together for N epochs against the
# layer's output before compression (--tune-scales, pyprune.pipeline.scale_tuning).
for _epochs in ("1", "2"):
    for _name in ("sparsegpt-50-int4-g64-sink256-refine-cap", "sparsegpt-50-int4-g64-sink256-refine-cap-seed1",
                  "sparsegpt-2of4-int4-g64-sink256-refine-cap", "gptq-int4-g64-sink256-act-refine-cap"):
        CONFIGS[f"{_name}-tune{_epochs}"] = CONFIGS[_name] + ["--tune-scales", _epochs]

# "-sinkW": the capped configurations at another sink weight (the cap makes the first token count as W
# typical tokens, so 256 may no longer be the right W).
for _weight in ("128", "512"):
    for _name in ("sparsegpt-50-sink256", "sparsegpt-50-int4-g64-sink256-refine"):
        CONFIGS[_name.replace("sink256", "sink" + _weight) + "-cap"] = [
            _weight if _flag == "256" else _flag for _flag in CONFIGS[_name]] + ["--sink-cap"]

# "-teacher": GPTQ after pruning calibrated against the pruned, unquantized model (--int4-teacher,
# pyprune.ops.teacher), its target's solve dampened by 1 x mean diag(H) ("-tdF": by F).
CONFIGS["sparsegpt-2of4-int4-g64-sink256-act-refine-original-cap"] = (
    CONFIGS["sparsegpt-2of4-int4-g64-sink256-act-refine-original"] + ["--sink-cap"])
for _name in ("sparsegpt-50-int4-g64-sink256-act-refine-original-cap", "gptq-int4-g64-sink256-act-refine-cap",
              "sparsegpt-2of4-int4-g64-sink256-act-refine-original-cap",
              "admm-grad-50-int4-g64-sink256-act-refine", "admm-grad-70-hessian-int4-g64-act-refine"):
    CONFIGS[_name + "-teacher"] = CONFIGS[_name] + ["--int4-teacher"]
    for _damp in ("0.1", "0.01"):
        CONFIGS[f"{_name}-teacher-td{_damp}"] = CONFIGS[_name] + ["--int4-teacher", "--teacher-damp", _damp]

# "-signed" / "-signed-mse": the refined configurations with signed scales (all 16 INT4 levels).
for _name in ("gptq-int4-g64-sink256-act-refine", "sparsegpt-50-int4-g64-sink256-refine",
              "sparsegpt-2of4-int4-g64-sink256-refine"):
    for _fit in ("signed", "signed-mse"):
        CONFIGS[f"{_name}-{_fit}"] = CONFIGS[_name] + ["--scale-fit", _fit]

# The GPTQ configurations above without "-act" ran in plain column order, the default before act-order,
# those without "-refine" ran before the refinement, those naming no scale fit used min-max scales,
# and the refinement after a pruning solver aimed at the pruned weight unless named "-original".
for _flags in CONFIGS.values():
    if "--wbits" in _flags:
        if "--scale-fit" not in _flags:
            _flags += ["--scale-fit", "minmax"]
        if "--quant-method" not in _flags:
            if "--act-order" not in _flags and "--no-act-order" not in _flags:
                _flags.append("--no-act-order")
            if "--refine-rounds" not in _flags:
                _flags += ["--refine-rounds", "0"]
            if "--refine-target" not in _flags:  # the default before "original"
                _flags += ["--refine-target", "pruned"]
        if "--tune-scales" not in _flags:  # the configurations above without "-tuneN" ran before the tuning
            _flags += ["--tune-scales", "0"]

# The configurations above with a sink weight above 1 and no "-cap" ran before --sink-cap became the
# default there.
for _flags in CONFIGS.values():
    _weighted = "--sink-weight" in _flags and float(_flags[_flags.index("--sink-weight") + 1]) > 1
    if _weighted and "--sink-cap" not in _flags:
        _flags.append("--no-sink-cap")

# Every ADMM-Grad configuration above ran while "final" was the CLI's re-selection default: pin it,
# so a name keeps meaning the flags of its recorded result ("-schedule" names the other variant).
for _flags in CONFIGS.values():
    if "admm" in _flags and "--mask" not in _flags and "--admm-reselect" not in _flags:
        _flags += ["--admm-reselect", "final"]


def self_calib_file(results, variant):
    suffix = "" if variant == "self" else "_" + variant
    return os.path.join(results, f"self_calib_32x2048_seed0{suffix}.safetensors")


def calibration_flags(flags, results):
    """Expand a SELF flag into flags that generate its calibration file, or reuse it."""
    selves = [f for f in flags if f.startswith(SELF)]
    if not selves:
        return flags
    variant = selves[0][len(SELF):]
    rest = [f for f in flags if f not in selves]
    path = self_calib_file(results, variant)
    if os.path.exists(path):
        return rest + ["--calib", path]
    return rest + ["--calib", "self", "--calib-batch-size", "32", *SELF_VARIANTS[variant], "--save-calib", path]


def machine():
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return f"{os.cpu_count()} CPU cores, no GPU, torch {torch.__version__}"


def run(name, data_dir, extra, results):
    import torch
    from pyprune.cli import build_parser, cmd_eval, cmd_prune

    os.makedirs(results, exist_ok=True)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.time()
    if name == "dense":
        args = build_parser().parse_args(["eval", "smollm2-135m", "--data-dir", data_dir, "--max-windows", "40",
                                          "--eval-seqlen", "2048", "--dtype", "float32", "--quiet", *extra])
        report = cmd_eval(args)
        report["totals"] = {"ppl": report["eval"]["ppl"], "eval_seconds": report["eval"]["seconds"],
                            "achieved_sparsity": 0.0, "pruning_seconds": 0.0}
    else:
        if name not in CONFIGS:
            raise SystemExit(f"unknown configuration {name!r}; known: dense, {', '.join(CONFIGS)}")
        flags = calibration_flags(CONFIGS[name], results) + extra
        # The configuration's flags come last, so they override COMMON (e.g. --calib).
        args = build_parser().parse_args(["prune", "smollm2-135m", *COMMON, "--data-dir", data_dir, *flags])
        report = cmd_prune(args)
    report["bench"] = {
        "name": name,
        "protocol": "P1",
        "wall_seconds": time.time() - start,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": os.environ.get("OMP_NUM_THREADS", "default"),
        "machine": machine(),
    }
    if torch.cuda.is_available():
        report["bench"]["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    with open(os.path.join(results, f"{name}.json"), "w") as f:
        json.dump(report, f, indent=1, default=str)
    print(json.dumps({"name": name, "ppl": report["totals"].get("ppl"), **report["bench"]}), flush=True)


def run_many(names, data_dir, extra, results, budget):
    """Run each configuration in turn in this process; start none after ``budget`` seconds."""
    import gc

    import torch

    start = time.time()
    for name in names:
        if budget and time.time() - start > budget:
            print(f"budget of {budget:.0f} s spent: not started {name}", flush=True)
            continue
        run(name, data_dir, extra, results)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _admm_options(config):
    if config.get("method") != "admm":
        return ""
    mask = config.get("mask", "gradual")
    unstructured = config.get("pattern") is None  # the re-selection choice applies to unstructured masks only
    parts = [f"gradual/{config.get('admm_reselect', 'schedule')}" if mask == "gradual" and unstructured else mask]
    parts.append("final solve" if config.get("final_solve", True) else "no final solve")
    return ", ".join(parts)


def _relative_error(totals):
    """The mean relative layer error as text; '*' marks the first recorded form (see the legend)."""
    if totals.get("mean_relative_error") is not None:
        return f"{totals['mean_relative_error']:.4f}"
    if totals.get("mean_relative_loss") is not None:
        return f"{totals['mean_relative_loss']:.4f}*"
    return ""


def table(results):
    rows, machines = [], set()
    for path in sorted(glob.glob(os.path.join(results, "*.json"))):
        with open(path) as f:
            r = json.load(f)
        t, b, config = r["totals"], r["bench"], r.get("config") or {}
        q = r.get("quantization") or {}
        sink = f"{config.get('sink_weight') or 1:g}"  # reports from before the option: plain statistics
        if config.get("sink_cap"):
            sink += " capped"
        calib = (r.get("calibration") or {}).get("source", "c4")
        rel = _relative_error(t)
        machines.add(b.get("machine", "2 CPU cores, no GPU"))
        rows.append((b["name"], t.get("ppl"), t.get("achieved_sparsity", 0.0), q.get("bits_per_weight"), sink, calib,
                     _admm_options(config), rel, t.get("pruning_seconds", 0.0), t.get("eval_seconds"),
                     b.get("peak_gpu_mib", b["peak_rss_mib"]), b["threads"]))
    on_gpu = any("CPU" not in m for m in machines)
    lines = [f"# Protocol P1 on smollm2-135m (fp32, {'GPU' if on_gpu else 'CPU'})", "",
             "Calibration 32 x 2048 tokens (seed 0; '-seedN': seed N): C4, or 'self' (sampled from the dense model); "
             "WikiText-2 test, first 40 windows of 2048 tokens.",
             f"Machine: {'; '.join(sorted(machines))}.",
             "Timings: " + ("one run at a time on the GPU; memory = peak GPU memory allocated."
                            if on_gpu else "a shared 2-core machine; threads 1 = two runs in parallel, "
                            "'default' = alone: compare loosely; memory = peak RSS."), "",
             "'sink' = --sink-weight (the first token of each window counted as that many tokens in the statistics); "
             "'capped' = --sink-cap (that token's input first shrunk to its window's median length).",
             "'rel. error' = mean over the 210 Linears of ||(W - W')X||^2 / ||WX||^2 on the calibration inputs, "
             "W' the final weight (blank: not recorded by that run). Marked '*': the first recorded form, the "
             "solver's loss over ||W'X||^2 (the compressed weight's output); with quantization after the solver "
             "(GPTQ alone, ADMM + INT4) it counts the pruning part only. With scale tuning ('-tuneN') it is the "
             "error before the tuning (the reports give each layer's block error before and after).", "",
             "| configuration | ppl | sparsity | bits/weight | sink | calibration | ADMM mask, final solve | rel. error "
             "| prune s | eval s | memory MiB | threads |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, ppl, sp, bits, sink, calib, admm, rel, ps, es, mem, th in rows:
        lines.append(f"| {name} | {ppl:.2f} | {sp:.3f} | {'' if bits is None else f'{bits:.3f}'} | {sink} | {calib} "
                     f"| {admm} | {rel} | {ps:.0f} | {es or 0:.0f} | {mem:.0f} | {th} |")
    with open(results.rstrip("/") + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


GRID_ROWS = [("magnitude", ""), ("wanda", ""), ("sparsegpt", ""), ("admm1", ""), ("admm1", "-nofinal"),
             ("admm-grad", ""), ("admm-grad", "-nofinal"), ("admm-grad", "-schedule")]


def grid(results):
    """DIR_grid.md: perplexity, mean relative layer error and pruning seconds, method x sparsity."""
    def load(name):
        path = os.path.join(results, f"{name}.json")
        if not os.path.exists(path):
            return None
        with open(path) as f:
            return json.load(f)

    lines = ["# P1 method x sparsity grid (sink weight 1 for every method)", "",
             "Each cell: perplexity / mean relative layer error / pruning seconds (calibration forward passes "
             "included). Blank: not run. The layer error is defined in the legend of the full table beside this "
             "file ('*': its first recorded form, the solver's loss over the compressed weight's output energy).", "",
             "| method | " + " | ".join(POINTS) + " |", "|---|" + "---|" * len(POINTS)]
    for method, suffix in GRID_ROWS:
        cells = []
        for point in POINTS:
            r = load(f"{method}-{point}{suffix}")
            if r is None:
                cells.append("")
                continue
            t = r["totals"]
            cells.append(f"{t['ppl']:.2f} / {_relative_error(t) or '-'} / {t['pruning_seconds']:.1f}")
        if any(cells):
            label = _admm_options((load(f"{method}-70{suffix}") or load(f"{method}-2of4{suffix}") or {})
                                  .get("config") or {})
            lines.append(f"| {method}{suffix}{f' ({label})' if label else ''} | " + " | ".join(cells) + " |")
    with open(results.rstrip("/") + "_grid.md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--results", default=RESULTS, help="folder of the result JSONs (the table is FOLDER.md)")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("names", nargs="+", help="configurations, run one after another in this process")
    r.add_argument("--data-dir", default=os.environ.get("PYPRUNE_DATA_DIR", DEFAULT_DATA))
    r.add_argument("--budget", type=float, default=0, help="start no configuration after this many seconds")
    sub.add_parser("table")
    sub.add_parser("grid")
    args, extra = p.parse_known_args()
    results = os.path.abspath(args.results)
    if args.cmd == "run":
        run_many(args.names, os.path.abspath(args.data_dir), extra, results, args.budget)
    elif args.cmd == "grid":
        grid(results)
    else:
        table(results)


if __name__ == "__main__":
    sys.exit(main())
