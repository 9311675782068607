"""Command line: ``pyprune prune`` and ``pyprune eval``."""
import argparse
import json
import os
import sys
import time

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _add_model_args(p):
    p.add_argument("--device", default=None, help="compute device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                   help="model dtype (auto: float16 on GPU, float32 on CPU)")
    p.add_argument("--data-dir", default=None,
                   help="local data folder (c4/*.jsonl, wikitext-2-raw-v1/*.jsonl); default: Hugging Face datasets")


def _add_eval_args(p, default_windows):
    p.add_argument("--eval-windows", "--max-windows", dest="eval_windows", type=int, default=default_windows,
                   help="WikiText-2 test windows to evaluate (-1 = all, 0 = skip)")
    p.add_argument("--eval-seqlen", type=int, default=2048, help="tokens per evaluation window")


def build_parser():
    parser = argparse.ArgumentParser(prog="pyprune", description="Prune and quantize causal LMs after training.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prune", help="prune a model (and evaluate / save it)")
    p.add_argument("model", help="Hugging Face id, local folder, .gguf file, or built-in name (smollm2-135m)")
    p.add_argument("--method", default="sparsegpt", help="magnitude, wanda, sparsegpt")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--sparsity", type=float, help="unstructured sparsity in [0, 1)")
    target.add_argument("--pattern", help="N:M semi-structured pattern, keep N of every M (2:4, 4:8)")
    p.add_argument("--calib", default="c4", choices=["c4", "wikitext2"], help="calibration text")
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows")
    p.add_argument("--seqlen", type=int, default=2048, help="tokens per calibration window")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration window offsets")
    p.add_argument("--batch-size", type=int, default=1, help="calibration windows per forward pass")
    p.add_argument("--activations", default="device", choices=["device", "cpu"],
                   help="keep calibration activations on the compute device or offload them to CPU")
    p.add_argument("--damp", type=float, default=0.01, help="sparsegpt dampening, fraction of mean diag(H)")
    p.add_argument("--blocksize", type=int, default=128, help="sparsegpt column block size")
    p.add_argument("--save", default=None, help="folder to save the pruned model (Hugging Face format)")
    p.add_argument("--report", default=None, help="JSON report path (default: SAVE/pyprune_report.json)")
    p.add_argument("--progress-dir", default=None,
                   help="folder for per-layer progress (default: SAVE.progress when --save is given)")
    p.add_argument("--resume", action="store_true", help="continue a killed run from its progress folder")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_model_args(p)
    _add_eval_args(p, default_windows=0)

    e = sub.add_parser("eval", help="perplexity of a model or of a saved pruned model")
    e.add_argument("model")
    e.add_argument("--report", default=None, help="JSON report path")
    e.add_argument("--quiet", action="store_true")
    _add_model_args(e)
    _add_eval_args(e, default_windows=-1)
    return parser


def _device_and_dtype(args):
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {device} requested but no CUDA GPU is available")
    dtype = DTYPES.get(args.dtype) or (torch.float16 if device.startswith("cuda") else torch.float32)
    return device, dtype


def _evaluate(model, tokenizer, args, device):
    from pyprune.data import evaluation_tokens
    from pyprune.eval import perplexity

    stream = evaluation_tokens(tokenizer, args.data_dir)
    windows = None if args.eval_windows < 0 else args.eval_windows
    model.to(device)
    try:
        return perplexity(model, stream, args.eval_seqlen, windows, device, progress=not args.quiet)
    finally:
        model.to("cpu")


def cmd_prune(args):
    from pyprune.data import calibration_tokens
    from pyprune.models import describe_linears, load_config, load_model
    from pyprune.models.families import LAYER_PATHS
    from pyprune.pipeline import RunOptions, prune_model
    from pyprune.pipeline.report import totals, versions, write_report
    from pyprune.schedule import UniformSchedule
    from pyprune.solvers import STATISTICS_FREE, SparsityPattern, get_solver

    # Everything that can be checked without loading weights is checked first.
    target = SparsityPattern.parse(args.pattern) if args.pattern else SparsityPattern(sparsity=args.sparsity)
    get_solver(args.method)
    if args.eval_windows != 0 or args.method not in STATISTICS_FREE:
        from pyprune.data.text import local_files

        if args.data_dir is not None:
            if args.method not in STATISTICS_FREE:
                local_files(args.calib, "validation", args.data_dir)
            if args.eval_windows != 0:
                local_files("wikitext2", "test", args.data_dir)
    config = load_config(args.model)
    if getattr(config, "model_type", None) not in LAYER_PATHS:
        print(f"note: model family {config.model_type!r} has no explicit adapter; using the generic one",
              file=sys.stderr)
    device, dtype = _device_and_dtype(args)
    progress_dir = args.progress_dir or (args.save + ".progress" if args.save else None)
    if args.resume and not progress_dir:
        raise SystemExit("error: --resume needs --progress-dir (or --save, whose progress folder is SAVE.progress)")
    options = RunOptions(device=device, activations=args.activations, batch_size=args.batch_size,
                         progress_dir=progress_dir, resume=args.resume, show_progress=not args.quiet,
                         fingerprint={"model": args.model, "target": str(target), "dtype": str(dtype)})

    t0 = time.time()
    model, tokenizer = load_model(args.model, dtype)
    for info in describe_linears(model):
        target.check_width(info.in_features, info.name)
    load_seconds = time.time() - t0
    tokens = None
    if args.method not in STATISTICS_FREE:
        tokens = calibration_tokens(tokenizer, args.calib, args.nsamples, args.seqlen, args.seed, args.data_dir)
    schedule = UniformSchedule(target)
    solver_options = {"damp": args.damp, "blocksize": args.blocksize} if args.method == "sparsegpt" else {}
    run = prune_model(model, tokens, args.method, schedule, solver_options, options)

    report = {
        "command": "prune",
        "model": args.model,
        "config": {k: v for k, v in vars(args).items() if k != "func"},
        "schedule": schedule.describe(),
        "calibration": {"source": args.calib, "nsamples": args.nsamples, "seqlen": args.seqlen,
                        "seed": args.seed, "data_dir": args.data_dir} if tokens is not None else None,
        "linears": run["records"],
        "totals": dict(totals(run["records"]), pruning_seconds=run["seconds"], load_seconds=load_seconds,
                       resumed_from_layer=run["resumed_from"]),
        "versions": versions(),
    }
    if args.save:
        model.save_pretrained(args.save)
        tokenizer.save_pretrained(args.save)
    if args.eval_windows != 0:
        result = _evaluate(model, tokenizer, args, device)
        report["eval"] = result
        report["totals"].update(ppl=result["ppl"], eval_seconds=result["seconds"])
    report_path = args.report or (os.path.join(args.save, "pyprune_report.json") if args.save else None)
    if report_path:
        write_report(report_path, report)
    _print_summary(report)
    return report


def cmd_eval(args):
    from pyprune.models import load_model
    from pyprune.pipeline.report import versions, write_report

    device, dtype = _device_and_dtype(args)
    if args.data_dir is not None:
        from pyprune.data.text import local_files

        local_files("wikitext2", "test", args.data_dir)
    model, tokenizer = load_model(args.model, dtype)
    result = _evaluate(model, tokenizer, args, device)
    report = {"command": "eval", "model": args.model, "eval": result,
              "config": {k: v for k, v in vars(args).items() if k != "func"}, "versions": versions()}
    if args.report:
        write_report(args.report, report)
    print(json.dumps({"ppl": round(result["ppl"], 4), "windows": result["windows"],
                      "seconds": round(result["seconds"], 1)}))
    return report


def _print_summary(report):
    t = report["totals"]
    line = {"achieved_sparsity": round(t["achieved_sparsity"], 4), "pruning_seconds": round(t["pruning_seconds"], 1)}
    if "ppl" in t:
        line["ppl"] = round(t["ppl"], 4)
    print(json.dumps(line))


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        if args.command == "prune":
            cmd_prune(args)
        elif args.command == "eval":
            cmd_eval(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
