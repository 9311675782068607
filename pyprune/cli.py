"""Command line: ``pyprune prune``, ``pyprune eval`` and ``pyprune compress``."""
import argparse
import json
import os
import sys
import time

import torch

from pyprune.ops import int4_refine
from pyprune.ops.int4_grid import SCALE_FITS
from pyprune.pipeline.scale_tuning import DEFAULT_EPOCHS as DEFAULT_TUNE_EPOCHS, ScaleTuning
from pyprune.solvers.quantize import DEFAULT_TEACHER_DAMP, REFINE_TARGETS

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
METHODS = ("magnitude", "wanda", "sparsegpt", "admm", "none")


def _add_model_args(p):
    p.add_argument("--device", default=None, help="compute device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                   help="model dtype (auto: float16 on GPU, float32 on CPU)")
    p.add_argument("--data-dir", default=None,
                   help="local data folder (c4/*.jsonl, wikitext-2-raw-v1/*.jsonl); default: Hugging Face datasets")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_eval_args(p, default_windows):
    p.add_argument("--eval-windows", "--max-windows", dest="eval_windows", type=int, default=default_windows,
                   help="WikiText-2 test windows to evaluate (-1 = all, 0 = skip)")
    p.add_argument("--eval-seqlen", type=int, default=2048, help="tokens per evaluation window")
    g = p.add_argument_group("zero-shot tasks (lm-evaluation-harness, pip install 'pyprune[eval]')")
    g.add_argument("--tasks", default=None, help="comma-separated harness tasks, e.g. boolq,rte,hellaswag")
    g.add_argument("--task-dir", action="append", default=[], help="folder of local task YAMLs (repeatable)")
    g.add_argument("--limit", type=int, default=None, help="at most N items per task")
    g.add_argument("--eval-batch-size", type=int, default=1, help="harness batch size")
    g.add_argument("--num-fewshot", type=int, default=0, help="few-shot examples per item")


def _add_calibration_args(p):
    g = p.add_argument_group("calibration")
    g.add_argument("--calib", default=None,
                   help="c4, wikitext2, self (text sampled from the dense model) or a calibration file "
                        "(default: c4 with --data-dir, else self)")
    g.add_argument("--nsamples", type=int, default=128, help="calibration windows")
    g.add_argument("--seqlen", type=int, default=2048, help="tokens per calibration window")
    g.add_argument("--seed", type=int, default=0, help="seed of window offsets / self-generated text")
    g.add_argument("--batch-size", type=int, default=1, help="calibration windows per forward pass")
    g.add_argument("--save-calib", default=None, help="write the calibration tokens to this file")
    g.add_argument("--calib-temperature", type=float, default=None, help="self-calibration temperature (1.0)")
    g.add_argument("--calib-top-p", type=float, default=None, help="self-calibration nucleus top-p (1.0: no cut)")
    g.add_argument("--calib-batch-size", type=int, default=None, help="self-calibration sequences per batch (8)")
    g.add_argument("--calib-prefix", default=None,
                   help="self-calibration: text every sample starts with, special tokens allowed, e.g. "
                        "'<|endoftext|>' (default: the BOS token)")
    g.add_argument("--calib-sample-len", type=int, default=None,
                   help="self-calibration: fill each window with independent samples of this many tokens "
                        "(a divisor of --seqlen; default: 128 where it divides --seqlen, else one sample per window)")
    g.add_argument("--sink-weight", type=float, default=None,
                   help="the first token of each window (the attention sink, read by every later token) counts "
                        "as this many tokens in the Hessians and input norms (default: 256 for sparsegpt and for "
                        "GPTQ without pruning or after sparsegpt; 1 for wanda, magnitude and admm, whose masks "
                        "follow input norms)")
    g.add_argument("--sink-cap", action=argparse.BooleanOptionalAction, default=None,
                   help="before the sink weight, shrink the first token's input to the median length of its "
                        "window's other tokens where it is longer, so that a massive activation there does not "
                        "make the whole Hessian of a Linear (default: on where the sink weight is above 1)")


def _add_solver_args(p):
    g = p.add_argument_group("solvers")
    g.add_argument("--damp", type=float, default=0.01, help="sparsegpt/gptq dampening, fraction of mean diag(H)")
    g.add_argument("--blocksize", type=int, default=128, help="sparsegpt/gptq column block size")
    g.add_argument("--true-sequential", action="store_true",
                   help="within each decoder layer, collect statistics and solve group by group (q/k/v, o, "
                        "gate/up, down), each group calibrated on inputs that the groups before it already "
                        "compressed (more forward passes; not with --schedule hessian, which plans from a "
                        "whole layer's statistics)")
    g.add_argument("--admm-iters", type=int, default=20, help="ADMM iterations")
    g.add_argument("--admm-mask-steps", type=int, default=15, help="iterations during which the mask is re-selected")
    g.add_argument("--admm-rho", type=float, default=1.0, help="ADMM penalty")
    g.add_argument("--admm-damp", type=float, default=0.1, help="ADMM dampening, fraction of mean diag")
    g.add_argument("--mask", default="gradual", choices=["gradual", "wanda", "magnitude"],
                   help="ADMM mask: gradual (ADMM-Grad) or fixed from wanda/magnitude (ADMM1)")
    g.add_argument("--admm-reselect", default="schedule", choices=["schedule", "final"],
                   help="gradual unstructured masks: follow the cubic schedule or re-select at the final sparsity")
    g.add_argument("--admm-per-row", action="store_true", help="gradual unstructured mask chosen per output row")
    g.add_argument("--admm-precision", default="fp32", choices=["fp32", "tf32", "fp16"],
                   help="matmuls of the ADMM iterations on CUDA (tf32, fp16: tensor cores; the final solve stays fp32)")
    g.add_argument("--final-solve", dest="final_solve", action="store_true", default=None,
                   help="finish with the exact solve of the layer loss on the final mask (ADMM: default; "
                        "SparseGPT: off by default, and with --wbits 4 it then prunes before act-order GPTQ)")
    g.add_argument("--no-final-solve", dest="final_solve", action="store_false")


def _add_schedule_args(p):
    from pyprune.schedule import (DEFAULT_LAMBDA, DEFAULT_LEVELS, DEFAULT_M, DEFAULT_NORMALISATION, DEFAULT_RANGE,
                                  NORMALISATIONS, SCHEDULES)

    g = p.add_argument_group("layer-wise sparsity")
    g.add_argument("--schedule", default="uniform", choices=SCHEDULES,
                   help="uniform, owl (outlier-weighted) or hessian (inverse-Hessian error estimates)")
    g.add_argument("--sparsity-range", nargs=2, type=float, metavar=("LO", "HI"), default=list(DEFAULT_RANGE),
                   help="hessian schedule: the range every layer's sparsity stays in")
    g.add_argument("--levels", type=int, default=DEFAULT_LEVELS, help="hessian schedule: error levels")
    g.add_argument("--schedule-granularity", default="layer", choices=["layer", "linear"],
                   help="hessian schedule: one sparsity per decoder layer or per Linear")
    g.add_argument("--schedule-normalise", default=DEFAULT_NORMALISATION, choices=NORMALISATIONS,
                   help="hessian schedule: divide each estimate by nothing, by the layer's output energy, "
                        "or by the residual stream's energy (default %(default)s)")
    g.add_argument("--owl-m", type=float, default=DEFAULT_M, help="OWL outlier threshold (x mean score)")
    g.add_argument("--owl-lambda", type=float, default=DEFAULT_LAMBDA, help="OWL sparsity spread around the target")


def _add_quant_args(p):
    g = p.add_argument_group("quantization")
    g.add_argument("--wbits", type=int, default=16, choices=[4, 16], help="4: INT4 weights; 16: no quantization")
    g.add_argument("--groupsize", type=int, default=128, help="INT4 columns per scale (32, 64, 128, 256; -1 per channel)")
    g.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=None,
                   help="GPTQ in decreasing Hessian-diagonal order, static groups, after pruning (default: "
                        "on, except with --method sparsegpt without --int4-teacher, which then prunes and "
                        "quantizes in one sweep)")
    g.add_argument("--quant-method", default="gptq", choices=["gptq", "rtn"], help="INT4 quantizer")
    g.add_argument("--scale-fit", default="minmax", choices=list(SCALE_FITS),
                   help="INT4 group scales: minmax (max|w|/7), signed (the sign of the scale gives the 8th "
                        "level to the side of the largest magnitude: all 16 levels), or mse / signed-mse (search "
                        "of shrunk scales for the smallest rounding error; on GPU the fitted-scale sweep then "
                        "runs unfused)")
    g.add_argument("--quant-damp", type=float, default=None, metavar="F",
                   help="GPTQ dampening (and its refinement's), fraction of mean diag(H), when GPTQ runs after "
                        "the pruning solver or alone (default: --damp; the joint SparseGPT sweep uses --damp)")
    g.add_argument("--refine-rounds", type=int, default=None, metavar="N",
                   help="GPTQ: N rounds revisiting every code (coordinate descent) and every group scale "
                        "(least squares) after the sweep; never raises the layer loss "
                        f"(default {int4_refine.DEFAULT_ROUNDS} with GPTQ, 0 = off)")
    g.add_argument("--int4-teacher", action="store_true",
                   help="GPTQ after pruning: calibrate each Linear against the pruned, unquantized model (its "
                        "output on its own inputs) instead of only on the quantized model's drifted inputs; prunes "
                        "exactly as without INT4, then quantizes group by group within each layer (no joint "
                        "sweep: implies --act-order with sparsegpt); keeps two activation streams")
    g.add_argument("--teacher-damp", type=float, default=None, metavar="F",
                   help="--int4-teacher: dampening of the target's least-squares solve, x mean diag(H) "
                        f"(default {DEFAULT_TEACHER_DAMP}; smaller fits the calibration data harder)")
    g.add_argument("--tune-scales", type=int, default=None, metavar="EPOCHS",
                   help="after each decoder layer is quantized, tune its group scales together for EPOCHS passes "
                        "over the calibration windows so the layer's output comes closer to its output before "
                        "compression (codes and mask unchanged; kept only if the calibration loss falls). "
                        f"Default {DEFAULT_TUNE_EPOCHS} with GPTQ (not with --int4-teacher or distributed runs), "
                        "0 = off")
    g.add_argument("--tune-scales-lr", type=float, default=None, metavar="LR",
                   help=f"--tune-scales: Adam step on the log scale multipliers (default {ScaleTuning.lr})")
    g.add_argument("--refine-target", default="original", choices=list(REFINE_TARGETS),
                   help="after a pruning solver, the refinement aims at the original weight (default: kept "
                        "codes also take up the pruning error) or at the pruned one; the joint SparseGPT "
                        "sweep always aims at the original")


def build_parser():
    parser = argparse.ArgumentParser(prog="pyprune", description="Prune and quantize causal LMs after training.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prune", help="prune (and/or quantize) a model, then evaluate / save it")
    p.add_argument("model", help="Hugging Face id, local folder, .gguf file, or built-in name (smollm2-135m)")
    p.add_argument("--method", default="sparsegpt", choices=METHODS,
                   help="pruning solver; none = quantization only (with --wbits 4)")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--sparsity", type=float, help="unstructured sparsity in [0, 1)")
    target.add_argument("--pattern", help="N:M semi-structured pattern, keep N of every M (2:4, 4:8)")
    p.add_argument("--activations", default="device", choices=["device", "cpu", "disk"],
                   help="calibration activations on the compute device, in CPU RAM, or memory-mapped on disk")
    p.add_argument("--activations-dir", default=None, help="folder for --activations disk (default: temp)")
    p.add_argument("--stream", action="store_true",
                   help="stream a safetensors checkpoint folder layer by layer (models larger than RAM); "
                        "the pruned checkpoint is written to --save")
    p.add_argument("--save", default=None, help="folder to save the pruned model (Hugging Face format)")
    p.add_argument("--report", default=None, help="JSON report path (default: SAVE/pyprune_report.json)")
    p.add_argument("--progress-dir", default=None,
                   help="folder for per-layer progress (default: SAVE.progress when --save is given)")
    p.add_argument("--resume", action="store_true", help="continue a killed run from its progress folder")
    loss = p.add_mutually_exclusive_group()
    loss.add_argument("--layer-loss", dest="layer_loss", action="store_true", default=None,
                      help="collect full Hessians even for wanda, so the report has each Linear's reconstruction "
                           "loss (the default, except with --stream)")
    loss.add_argument("--no-layer-loss", dest="layer_loss", action="store_false",
                      help="wanda keeps only its input norms (in_features numbers per Linear instead of "
                           "in_features^2, 0.3 GiB less for an 8640-wide Linear); no per-Linear loss for wanda")
    _add_calibration_args(p)
    _add_solver_args(p)
    _add_schedule_args(p)
    _add_quant_args(p)
    _add_model_args(p)
    _add_eval_args(p, default_windows=0)

    e = sub.add_parser("eval", help="perplexity of a model, a saved pruned model or a compressed checkpoint")
    e.add_argument("model")
    e.add_argument("--report", default=None, help="JSON report path")
    _add_model_args(e)
    _add_eval_args(e, default_windows=-1)

    c = sub.add_parser("compress", help="pack a saved pruned/quantized model into a compressed checkpoint")
    c.add_argument("model", help="folder written by `pyprune prune --save`")
    c.add_argument("--format", required=True, choices=["2:4", "int4", "2:4-int4"])
    c.add_argument("--groupsize", type=int, default=128,
                   help="INT4 group size for layers without saved INT4 codes (round-to-nearest)")
    c.add_argument("--out", required=True, help="output folder")
    c.add_argument("--strict", action="store_true", help="fail instead of skipping a Linear that does not fit")

    from pyprune import plot

    plot.add_arguments(sub.add_parser("plot", help="PNG of per-layer sparsity and estimated error of a report"))
    return parser


def _device_and_dtype(args):
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device} requested but no CUDA GPU is available")
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


def _check_tasks(args):
    """Fail before any model work when the harness is missing or a task is unknown."""
    if args.tasks:
        from pyprune.eval.harness import resolve_tasks

        resolve_tasks(args.tasks, args.task_dir)


def _zero_shot(model, tokenizer, args, device, report):
    """Run the harness tasks on the in-memory model; results go into ``report``."""
    if not args.tasks:
        return
    from pyprune.eval.harness import evaluate_tasks, format_table

    model.to(device)
    try:
        result = evaluate_tasks(model, tokenizer, args.tasks, limit=args.limit, batch_size=args.eval_batch_size,
                                task_dirs=args.task_dir, num_fewshot=args.num_fewshot)
    finally:
        model.to("cpu")
    report["zero_shot"] = result
    report.setdefault("totals", {})["mean_acc"] = result.get("mean_acc")
    print(format_table(result), file=sys.stderr)


# ---------------------------------------------------------------------------------------- prune

def _target(args):
    from pyprune.solvers import SparsityPattern

    if args.method == "none":
        if args.sparsity or args.pattern:
            raise ValueError("--method none keeps every weight; drop --sparsity/--pattern or pick a pruning method")
        if args.wbits != 4:
            raise ValueError("--method none does nothing without --wbits 4 (quantization only)")
        return SparsityPattern(sparsity=0.0)
    if args.pattern:
        return SparsityPattern.parse(args.pattern)
    if args.sparsity is None:
        raise ValueError(f"--method {args.method} needs --sparsity S or --pattern N:M")
    return SparsityPattern(sparsity=args.sparsity)


def _calibration_source(args):
    source = args.calib or ("c4" if args.data_dir else "self")
    if source in ("c4", "wikitext2", "self"):
        return source
    if not os.path.isfile(source):
        raise FileNotFoundError(f"--calib {source!r} is neither c4, wikitext2, self nor an existing calibration file")
    return source


def _check_inputs_before_loading(args, target, needs_calibration, calib):
    """Everything checkable without the model's weights, so bad input fails in seconds."""
    from pyprune.data.calibration import check_window_args
    from pyprune.data.text import local_files
    from pyprune.pipeline.statistics import check_sink_weight

    check_sink_weight(args.sink_weight)
    if needs_calibration:
        check_window_args(args.nsamples, args.seqlen)
        if calib == "self":
            from pyprune.data.self_calibration import check_generation_args

            check_generation_args(args.nsamples, args.seqlen, args.seed, *_self_calib_options(args),
                                  sample_len=args.calib_sample_len)
        elif calib in ("c4", "wikitext2") and args.data_dir is not None:
            local_files(calib, "validation", args.data_dir)
        elif calib not in ("c4", "wikitext2"):
            from pyprune.data.calibration_file import load_calibration

            load_calibration(calib, nsamples=args.nsamples, seqlen=args.seqlen)
    if args.eval_windows != 0 and args.data_dir is not None:
        local_files("wikitext2", "test", args.data_dir)
    _check_tasks(args)
    if args.wbits == 4 and args.act_order and args.quant_method != "gptq":
        raise ValueError("--act-order is a GPTQ option; it cannot be used with --quant-method rtn")
    if args.wbits == 4 and args.refine_rounds and args.quant_method != "gptq":
        raise ValueError("--refine-rounds is a GPTQ option; it cannot be used with --quant-method rtn")
    if args.refine_rounds < 0:
        raise ValueError(f"--refine-rounds {args.refine_rounds}: must be >= 0 (0 = no refinement)")
    if args.teacher_damp is not None and not (args.int4_teacher and args.teacher_damp > 0):
        raise ValueError(f"--teacher-damp {args.teacher_damp}: needs --int4-teacher and a value > 0")
    if args.int4_teacher:
        from pyprune.pipeline.distributed import world_size_from_env

        if not (args.wbits == 4 and args.quant_method == "gptq"):
            raise ValueError("--int4-teacher calibrates GPTQ: it needs --wbits 4 and --quant-method gptq")
        if args.stream or args.activations == "disk" or world_size_from_env() > 1:
            raise ValueError("--int4-teacher keeps two activation streams in memory: it cannot be used with "
                             "--stream, --activations disk or a distributed run")
        if args.resume or args.progress_dir:
            raise ValueError("--int4-teacher runs keep no progress folder: drop --resume / --progress-dir")
    _scale_tuning(args)  # refuses bad settings before the model loads


def _scale_tuning_excluded(args) -> bool:
    """Scale tuning cannot run with --int4-teacher or in a distributed run."""
    from pyprune.pipeline.distributed import world_size_from_env

    return bool(args.int4_teacher) or world_size_from_env() > 1


def _scale_tuning(args):
    """The ``ScaleTuning`` that ``--tune-scales`` asks for (None when off)."""
    if args.tune_scales_lr is not None and not args.tune_scales:
        raise ValueError(f"--tune-scales-lr {args.tune_scales_lr}: scale tuning is off in this run (it needs "
                         "--wbits 4, --quant-method gptq and --tune-scales of at least 1)")
    if args.tune_scales < 0:
        raise ValueError(f"--tune-scales {args.tune_scales}: must be >= 0 (epochs; 0 = off)")
    if not args.tune_scales:
        return None
    if not (args.wbits == 4 and args.quant_method == "gptq"):
        raise ValueError("--tune-scales tunes INT4 scales on calibration data: it needs --wbits 4 and "
                         "--quant-method gptq")
    if _scale_tuning_excluded(args):
        raise ValueError("--tune-scales cannot be used with --int4-teacher or in a distributed run")
    lr = ScaleTuning.lr if args.tune_scales_lr is None else args.tune_scales_lr
    return ScaleTuning(epochs=args.tune_scales, lr=lr)


def _self_calib_options(args):
    from pyprune.data import self_calibration as sc

    return (sc.DEFAULT_TEMPERATURE if args.calib_temperature is None else args.calib_temperature,
            sc.DEFAULT_TOP_P if args.calib_top_p is None else args.calib_top_p,
            sc.DEFAULT_BATCH_SIZE if args.calib_batch_size is None else args.calib_batch_size)


def _calibration_tokens(args, calib, model, tokenizer, device, progress_dir):
    """``(tokens [nsamples, seqlen], description for the report)``."""
    from pyprune.data import calibration_tokens
    from pyprune.data.calibration_file import load_calibration, save_calibration

    if calib in ("c4", "wikitext2"):
        tokens = calibration_tokens(tokenizer, calib, args.nsamples, args.seqlen, args.seed, args.data_dir)
        info = {"source": calib, "nsamples": args.nsamples, "seqlen": args.seqlen, "seed": args.seed,
                "data_dir": args.data_dir or "huggingface datasets"}
    elif calib == "self":
        saved = os.path.join(progress_dir, "calibration.safetensors") if progress_dir else None
        if saved and args.resume and os.path.isfile(saved):  # a resumed run reuses its own text
            tokens, info = load_calibration(saved, nsamples=args.nsamples, seqlen=args.seqlen)
        else:
            from pyprune.data.self_calibration import generate_calibration

            temperature, top_p, batch = _self_calib_options(args)
            tokens, info = generate_calibration(model, tokenizer, args.nsamples, args.seqlen, seed=args.seed,
                                                temperature=temperature, top_p=top_p, batch_size=batch,
                                                prefix=args.calib_prefix, sample_len=args.calib_sample_len,
                                                device=device, progress=not args.quiet)
            if saved:
                save_calibration(saved, tokens, info)
    else:
        tokens, info = load_calibration(calib, nsamples=args.nsamples, seqlen=args.seqlen,
                                        vocab_size=model.config.vocab_size)
        info = dict(info, file=os.path.abspath(calib))
    if args.save_calib:
        from pyprune.data.calibration_file import save_calibration

        save_calibration(args.save_calib, tokens, info)
    return tokens, info


def _solver_and_options(args, target):
    """The solver (name or function), its options and the post-solve quantizer (or None)."""
    from pyprune.solvers.quantize import LayerQuantizer, no_pruning, sparsegpt_int4_solver

    method = args.method
    options = {}
    if method == "sparsegpt":
        options = {"damp": args.damp, "blocksize": args.blocksize, "final_solve": args.final_solve}
    elif method == "admm":
        options = {"iters": args.admm_iters, "mask_steps": args.admm_mask_steps, "rho": args.admm_rho,
                   "damp": args.admm_damp, "mask": args.mask, "final_solve": args.final_solve,
                   "per_row": args.admm_per_row, "reselect": args.admm_reselect,
                   "precision": args.admm_precision}
    quantizer = None
    if args.wbits == 4:
        teacher_damp = DEFAULT_TEACHER_DAMP if args.teacher_damp is None else args.teacher_damp
        quantizer = LayerQuantizer(args.quant_method, args.groupsize, args.act_order, nm=target.nm,
                                   refine_target=args.refine_target, scale_fit=args.scale_fit,
                                   teacher_damp=teacher_damp,
                                   **({"damp": args.quant_damp, "blocksize": args.blocksize,
                                       "refine_rounds": args.refine_rounds}
                                      if args.quant_method == "gptq" else {}))
        if method == "none":
            method = no_pruning
        elif method == "sparsegpt" and args.quant_method == "gptq" and not args.act_order:
            # prune and quantize in one sweep
            method = sparsegpt_int4_solver(args.groupsize, args.scale_fit, args.refine_rounds)
    return method, options, quantizer


def _check_model_fits(model, target, args):
    from pyprune.models import describe_linears
    from pyprune.ops import int4_grid

    for info in describe_linears(model):
        target.check_width(info.in_features, info.name)
        if args.wbits == 4:
            try:
                int4_grid.check_groupsize(args.groupsize, info.in_features)
            except ValueError as exc:
                raise ValueError(f"{info.name}: {exc}") from None


def cmd_prune(args):
    from pyprune.models import load_config, load_model
    from pyprune.models.families import LAYER_PATHS
    from pyprune.pipeline import RunOptions, prune_model
    from pyprune.pipeline.report import totals, versions, write_report
    from pyprune.pipeline.statistics import default_sink_weight
    from pyprune.schedule import make_schedule
    from pyprune.solvers import statistics_needed

    target = _target(args)
    schedule = make_schedule(args.schedule, target, sparsity_range=tuple(args.sparsity_range), levels=args.levels,
                             granularity=args.schedule_granularity, owl_m=args.owl_m, owl_lambda=args.owl_lambda,
                             normalise=args.schedule_normalise, damp=args.damp)
    solver_reads = None if args.method == "none" else statistics_needed(args.method)
    gptq = args.wbits == 4 and args.quant_method == "gptq"
    if args.final_solve is None:
        args.final_solve = args.method == "admm"
    elif args.final_solve and args.method not in ("admm", "sparsegpt"):
        raise ValueError(f"--final-solve applies to --method admm or sparsegpt, not {args.method!r}")
    if args.int4_teacher and args.method == "sparsegpt" and gptq:
        if args.act_order is False:
            raise ValueError("--int4-teacher quantizes after pruning; the joint SparseGPT + INT4 sweep "
                             "(--no-act-order) has no pruned, unquantized model: drop one of them")
        args.act_order = True
    if args.final_solve and args.method == "sparsegpt" and gptq:
        if args.act_order is False:
            raise ValueError("--final-solve with SparseGPT and --wbits 4 prunes before GPTQ; the joint sweep "
                             "(--no-act-order) has no final solve: drop one of them")
        args.act_order = True
    if args.act_order is None:
        # Under P1 on SmolLM2-135M (README, pruning with INT4): act-order beat the plain column
        # order, with and without pruning (its static groups cost nothing at inference), except
        # for SparseGPT, where the joint sweep followed by the refinement beat both.
        args.act_order = gptq and args.method != "sparsegpt"
    if args.refine_rounds is None:
        args.refine_rounds = int4_refine.DEFAULT_ROUNDS if gptq else 0
    if args.tune_scales is None:  # on wherever it can run (README: block-wise scale tuning)
        args.tune_scales = DEFAULT_TUNE_EPOCHS if gptq and not _scale_tuning_excluded(args) else 0
    if args.quant_damp is not None:
        if not gptq:
            raise ValueError("--quant-damp is GPTQ's dampening; it needs --wbits 4 and --quant-method gptq")
        if args.method == "sparsegpt" and not args.act_order:
            raise ValueError("--quant-damp applies to GPTQ after pruning; the joint SparseGPT + INT4 sweep "
                             "(--no-act-order) uses --damp for both: give --act-order or drop --quant-damp")
        if not 0 < args.quant_damp < 10:
            raise ValueError(f"--quant-damp {args.quant_damp}: must be in (0, 10) (a fraction of mean diag(H))")
    else:
        args.quant_damp = args.damp
    needs_calibration = solver_reads is not None or gptq or args.schedule != "uniform"
    if args.true_sequential and not needs_calibration:
        raise ValueError(f"--true-sequential orders the calibration statistics; --method {args.method} "
                         "without GPTQ collects none")
    if args.true_sequential and args.schedule == "hessian":
        raise ValueError("--true-sequential cannot be used with --schedule hessian: its online correction "
                         "reads every Linear's statistics of a layer at once")
    if args.sink_cap and not needs_calibration:
        raise ValueError(f"--sink-cap shapes the calibration statistics; --method {args.method} without GPTQ "
                         "collects none")
    if args.sink_weight is None:
        args.sink_weight = default_sink_weight(args.method, gptq)
    if args.sink_cap is None:  # the cap makes the weight mean "W typical tokens" (pipeline.statistics)
        args.sink_cap = needs_calibration and args.sink_weight > 1.0
    calib = _calibration_source(args) if needs_calibration else None
    _check_inputs_before_loading(args, target, needs_calibration, calib)
    if args.resume and args.wbits == 4:
        raise ValueError("--resume is not supported together with --wbits 4 (the INT4 codes of layers "
                         "pruned before the restart are not kept in the progress folder)")
    config = load_config(args.model)
    if getattr(config, "model_type", None) not in LAYER_PATHS:
        print(f"note: model family {config.model_type!r} has no explicit adapter; using the generic one",
              file=sys.stderr)
    device, dtype = _device_and_dtype(args)
    if args.device is None and torch.cuda.is_available():
        from pyprune.pipeline.distributed import local_device

        device = local_device()  # under torchrun, each process takes its own GPU
    progress_dir = args.progress_dir or (args.save + ".progress" if args.save and not args.int4_teacher else None)
    if args.resume and not progress_dir:
        raise ValueError("--resume needs --progress-dir (or --save, whose progress folder is SAVE.progress)")

    if args.stream:
        _check_streaming(args)
    distributed = _distributed_from_env()
    t0 = time.time()
    if args.stream:  # weights stay on disk: a skeleton to check widths, the tokenizer, and no more
        from transformers import AutoTokenizer

        from pyprune.pipeline.streaming import load_skeleton

        model, tokenizer = load_skeleton(args.model, dtype), AutoTokenizer.from_pretrained(args.model)
    else:
        model, tokenizer = load_model(args.model, dtype)
    _check_model_fits(model, target, args)
    load_seconds = time.time() - t0
    method, solver_options, quantizer = _solver_and_options(args, target)
    tokens, calib_info = None, None
    if needs_calibration:
        tokens, calib_info = _calibration_tokens(args, calib, model, tokenizer, device, progress_dir)
    if args.layer_loss is None:
        args.layer_loss = not args.stream  # streamed runs save the memory; the report records the choice
    options = RunOptions(device=device, activations=args.activations, activations_dir=args.activations_dir,
                         batch_size=args.batch_size, progress_dir=progress_dir, resume=args.resume,
                         show_progress=not args.quiet, distributed=distributed, layer_loss=args.layer_loss,
                         sink_weight=args.sink_weight, sink_cap=args.sink_cap, true_sequential=args.true_sequential,
                         teacher=args.int4_teacher, scale_tuning=_scale_tuning(args),
                         fingerprint={"model": args.model, "target": str(target), "dtype": str(dtype),
                                      "wbits": args.wbits, "groupsize": args.groupsize})
    if args.stream:
        from pyprune.pipeline.streaming import prune_streamed

        run = prune_streamed(args.model, args.save, tokens, method, schedule, solver_options, options,
                             post_solve=quantizer, dtype=dtype)
    else:
        run = prune_model(model, tokens, method, schedule, solver_options, options, post_solve=quantizer)

    report = {
        "command": "prune",
        "model": args.model,
        "config": {k: v for k, v in vars(args).items() if k != "func"},
        "schedule": schedule.describe(),
        "activations": run.get("activations"),
        "calibration": calib_info,
        "linears": run["records"],
        "totals": dict(totals(run["records"]), pruning_seconds=run["seconds"], load_seconds=load_seconds,
                       resumed_from_layer=run["resumed_from"]),
        "versions": versions(),
    }
    if calib_info and "seconds" in calib_info:
        report["totals"]["calibration_seconds"] = calib_info["seconds"]
    if quantizer is not None:
        cost = quantizer.storage()
        report["quantization"] = {"wbits": 4, "groupsize": args.groupsize, "method": args.quant_method,
                                  "act_order": args.act_order, "scale_fit": args.scale_fit,
                                  "refine_rounds": args.refine_rounds, "refine_target": args.refine_target,
                                  "tune_scales_epochs": args.tune_scales,
                                  "tune_scales_lr": options.scale_tuning.lr if options.scale_tuning else None,
                                  "damp": args.quant_damp if args.quant_method == "gptq" else None,
                                  "int4_teacher": args.int4_teacher,
                                  "teacher_damp": quantizer.teacher_damp if args.int4_teacher else None,
                                  "bits_per_weight": cost.bits_per_weight,
                                  "compressed_bytes": cost.nbytes, "fp16_bytes": 2 * report["totals"]["parameters"]}
    if distributed is not None and not distributed.is_main:
        return report  # rank 0 writes the model and the report
    if args.save:
        if not args.stream:  # a streamed run has written its checkpoint already
            model.save_pretrained(args.save)
        tokenizer.save_pretrained(args.save)
        if quantizer is not None:
            from pyprune.formats.quant_state import save_quant_state

            save_quant_state(args.save, quantizer.results, metadata={"groupsize": args.groupsize,
                                                                      "method": args.quant_method})
    if args.eval_windows != 0:
        result = _evaluate(model, tokenizer, args, device)
        report["eval"] = result
        report["totals"].update(ppl=result["ppl"], eval_seconds=result["seconds"])
    _zero_shot(model, tokenizer, args, device, report)
    report_path = args.report or (os.path.join(args.save, "pyprune_report.json") if args.save else None)
    if report_path:
        write_report(report_path, report)
    _print_summary(report)
    return report


def _check_streaming(args):
    from pyprune.pipeline.streaming import is_checkpoint_folder

    if not is_checkpoint_folder(args.model):
        raise ValueError(f"--stream needs a local safetensors checkpoint folder, got {args.model!r}")
    if not args.save:
        raise ValueError("--stream writes the pruned checkpoint layer by layer: give the folder with --save")
    if args.eval_windows != 0 or args.tasks:
        raise ValueError("--stream does not evaluate in the same run (the model is never in memory): "
                         "run `pyprune eval SAVE` afterwards")
    if args.calib == "self":
        raise ValueError("--stream cannot generate self-calibration text (the model is never in memory); "
                         "use --calib c4/wikitext2 or a calibration file")


def _distributed_from_env():
    """Under torchrun (WORLD_SIZE > 1) the statistics and solves are split over the processes."""
    from pyprune.pipeline.distributed import init_from_env

    return init_from_env()


def _print_summary(report):
    t = report["totals"]
    line = {"achieved_sparsity": round(t["achieved_sparsity"], 4), "pruning_seconds": round(t["pruning_seconds"], 1)}
    if "quantization" in report:
        line["bits_per_weight"] = round(report["quantization"]["bits_per_weight"], 3)
    if "ppl" in t:
        line["ppl"] = round(t["ppl"], 4)
    print(json.dumps(line))


# ----------------------------------------------------------------------------------------- eval

def load_for_eval(path, dtype, device):
    """``(model, tokenizer, kind)`` for a model name/folder, a pruned folder (with its INT4 sidecar
    applied, if any) or a compressed checkpoint."""
    from pyprune.checkpoint import is_compressed_checkpoint, load, load_tokenizer

    if os.path.isdir(path) and is_compressed_checkpoint(path):
        model = load(path, dtype=dtype if str(device).startswith("cpu") else None)
        tokenizer = load_tokenizer(path)
        if tokenizer is None:
            raise ValueError(f"compressed checkpoint {path} holds no tokenizer files")
        if str(device).startswith("cpu"):
            from pyprune.nn import cache_reference_weights

            cache_reference_weights(model)
        return model, tokenizer, "compressed"
    from pyprune.formats.quant_state import SIDECAR_NAME, apply_quant_state, load_quant_state
    from pyprune.models import load_model

    model, tokenizer = load_model(path, dtype)
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, SIDECAR_NAME)):
        apply_quant_state(model, load_quant_state(path))
        return model, tokenizer, "int4-sidecar"
    return model, tokenizer, "dense"


def cmd_eval(args):
    from pyprune.pipeline.report import versions, write_report

    device, dtype = _device_and_dtype(args)
    if args.data_dir is not None:
        from pyprune.data.text import local_files

        local_files("wikitext2", "test", args.data_dir)
    _check_tasks(args)
    model, tokenizer, kind = load_for_eval(args.model, dtype, device)
    report = {"command": "eval", "model": args.model, "model_kind": kind,
              "config": {k: v for k, v in vars(args).items() if k != "func"}, "versions": versions()}
    line = {}
    if args.eval_windows != 0:
        result = _evaluate(model, tokenizer, args, device)
        report["eval"] = result
        line = {"ppl": round(result["ppl"], 4), "windows": result["windows"], "seconds": round(result["seconds"], 1)}
    _zero_shot(model, tokenizer, args, device, report)
    if "zero_shot" in report:
        line["mean_acc"] = report["zero_shot"].get("mean_acc")
    if args.report:
        write_report(args.report, report)
    print(json.dumps(line))
    return report


# ------------------------------------------------------------------------------------- compress

def cmd_compress(args):
    from pyprune.checkpoint import save_compressed
    from pyprune.compress import compress
    from pyprune.formats.quant_state import SIDECAR_NAME, load_quant_state
    from pyprune.models import load_model

    if not os.path.isdir(args.model):
        raise FileNotFoundError(f"saved model folder not found: {args.model}")
    states = None
    if os.path.isfile(os.path.join(args.model, SIDECAR_NAME)):
        states = load_quant_state(args.model)
    model, tokenizer = load_model(args.model, torch.float16)
    report = compress(model, args.format, groupsize=args.groupsize, quant_state=states, strict=args.strict)
    size = save_compressed(model, args.out, tokenizer=tokenizer, report=report)
    print(report, file=sys.stderr)
    totals = report.totals()
    print(json.dumps({"format": args.format, "packed": totals["compressed"], "linears": totals["linears"],
                      "on_disk_bytes": size["on_disk_bytes"], "ratio_vs_fp16": round(size["ratio_vs_fp16"], 4)}))
    return report.to_dict(), size


def main(argv=None):
    args = build_parser().parse_args(argv)
    from pyprune import plot

    commands = {"prune": cmd_prune, "eval": cmd_eval, "compress": cmd_compress, "plot": plot.run}
    try:
        commands[args.command](args)
    except (ValueError, FileNotFoundError, ImportError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
