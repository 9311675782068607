"""Zero-shot accuracy of dense vs pruned models through the lm-evaluation-harness bridge.

Each model (a built-in name such as ``smollm2-135m``, a Hugging Face folder written by
``pyprune prune --save``, or a Hub id when online) is loaded once and scored in memory by
``pyprune.eval.harness.evaluate_tasks`` on a local multiple-choice task built from the project's
own text (``bench/make_local_tasks.py``: next-sentence choice among 4, WikiText-2 test split),
plus any harness task whose data is available. ``--prune METHOD:TARGET`` adds in-memory pruned
copies of every model (e.g. ``magnitude:0.5``, ``sparsegpt:0.5``, ``sparsegpt:2:4``).

When perplexities are known (``--ppl-windows N`` computes WikiText-2 test perplexity on the first
N windows of 2048 tokens; otherwise ``totals.ppl`` is read from a saved model's
``pyprune_report.json``), the output states whether the accuracy ordering agrees with the
perplexity ordering.

Writes ``<out>.json`` and ``<out>.md`` (default ``bench/results/zero_shot``).

    python bench/bench_zero_shot.py --models smollm2-135m --prune magnitude:0.5
    python bench/bench_zero_shot.py --models dense=smollm2-135m sgpt50=runs/sgpt50 best70=runs/best70 \
        --ppl dense=20.38
"""
import argparse
import copy
import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import make_local_tasks  # noqa: E402

from pyprune.eval.harness import (  # noqa: E402
    evaluate_tasks, format_table, harness_version, require_harness, resolve_tasks,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_model_specs(specs):
    """``["smollm2-135m", "sgpt50=runs/sgpt50"]`` -> ``[(label, name_or_path), ...]``."""
    out = []
    for spec in specs:
        label, _, source = spec.partition("=") if "=" in spec else (None, None, spec)
        label = label or os.path.basename(os.path.normpath(source))
        if label in [lab for lab, _ in out]:
            raise ValueError(f"model label {label!r} given twice; name them with LABEL=PATH")
        out.append((label, source))
    return out


def parse_prune_specs(specs):
    """``["magnitude:0.5", "sparsegpt:2:4"]`` -> ``[(method, SparsityPattern), ...]``."""
    from pyprune.solvers import SparsityPattern, get_solver

    out = []
    for spec in specs:
        method, sep, target = spec.partition(":")
        if not sep:
            raise ValueError(f"--prune {spec!r}: use METHOD:SPARSITY or METHOD:N:M (e.g. magnitude:0.5)")
        get_solver(method)
        out.append((method, SparsityPattern.parse(target)))
    return out


def saved_perplexity(source):
    """``totals.ppl`` from the ``pyprune_report.json`` that ``pyprune prune --save`` writes."""
    path = os.path.join(source, "pyprune_report.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        report = json.load(f)
    return (report.get("totals") or {}).get("ppl")


def prune_in_memory(model, tokenizer, method, pattern, args):
    from pyprune.data import calibration_tokens
    from pyprune.pipeline import RunOptions, prune_model
    from pyprune.pipeline.report import totals
    from pyprune.schedule import UniformSchedule
    from pyprune.solvers import STATISTICS_FREE

    tokens = None
    if method not in STATISTICS_FREE:
        tokens = calibration_tokens(tokenizer, "c4", args.nsamples, args.seqlen, 0, args.data_dir)
    run = prune_model(model, tokens, method, UniformSchedule(pattern), {}, RunOptions(show_progress=False))
    return {"method": method, "target": str(pattern), "seconds": run["seconds"],
            "achieved_sparsity": totals(run["records"])["achieved_sparsity"],
            "calibration": None if tokens is None else {"source": "c4", "nsamples": args.nsamples,
                                                        "seqlen": args.seqlen, "seed": 0}}


def perplexity_of(model, tokenizer, args):
    from pyprune.data import evaluation_tokens
    from pyprune.eval.perplexity import perplexity

    stream = evaluation_tokens(tokenizer, args.data_dir)
    return perplexity(model, stream, 2048, args.ppl_windows, "cpu", progress=False)


def ordering_agrees(rows, metric="mean_acc"):
    """True when sorting by perplexity (ascending) sorts ``metric`` descending (ties allowed);
    None with fewer than two perplexities."""
    known = [r for r in rows if r.get("ppl") is not None and r["zero_shot"].get(metric) is not None]
    if len(known) < 2:
        return None
    known.sort(key=lambda r: r["ppl"])
    accs = [r["zero_shot"][metric] for r in known]
    return all(a >= b for a, b in zip(accs, accs[1:]))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["smollm2-135m"],
                   help="models to score, NAME_OR_PATH or LABEL=NAME_OR_PATH")
    p.add_argument("--prune", nargs="*", default=[],
                   help="also score in-memory pruned copies: METHOD:SPARSITY or METHOD:N:M")
    p.add_argument("--no-dense", action="store_true",
                   help="with --prune: score only the pruned copies, not the models as loaded")
    p.add_argument("--tasks", default=None,
                   help="comma-separated task names (default: the local next-sentence task)")
    p.add_argument("--task-dir", default=make_local_tasks.DEFAULT_OUT,
                   help="folder of local task YAMLs; the default task is built there if missing")
    p.add_argument("--items", type=int, default=300, help="items when building the local task")
    p.add_argument("--limit", type=int, default=None, help="items per task (default: all)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--ppl-windows", type=int, default=0,
                   help="also compute WikiText-2 test perplexity on this many 2048-token windows")
    p.add_argument("--ppl", nargs="*", default=[],
                   help="known perplexities LABEL=VALUE (e.g. dense=20.38 under P1) for the ordering check")
    p.add_argument("--nsamples", type=int, default=32, help="calibration windows for --prune methods")
    p.add_argument("--seqlen", type=int, default=2048, help="calibration window length for --prune")
    p.add_argument("--data-dir", default=make_local_tasks.DEFAULT_DATA)
    p.add_argument("--out", default=os.path.join(HERE, "results", "zero_shot"),
                   help="output prefix: writes OUT.json and OUT.md")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    # Everything checkable is checked before a model is loaded.
    require_harness()
    models = parse_model_specs(args.models)
    prunes = parse_prune_specs(args.prune)
    known_ppl = {}
    for spec in args.ppl:
        label, sep, value = spec.partition("=")
        try:
            known_ppl[label] = float(value)
        except ValueError:
            raise SystemExit(f"error: --ppl {spec!r}: use LABEL=VALUE, e.g. dense=20.38") from None
    default_task = make_local_tasks.task_name("wikitext")
    tasks = args.tasks or default_task
    if default_task in tasks.split(",") and not os.path.isfile(os.path.join(args.task_dir, default_task + ".yaml")):
        print(json.dumps(make_local_tasks.write_task(args.task_dir, n_items=args.items, data_dir=args.data_dir)))
    task_names, _ = resolve_tasks(tasks, [args.task_dir])

    from pyprune.models import load_model

    rows = []
    for label, source in models:
        t0 = time.perf_counter()
        dense, tokenizer = load_model(source, DTYPES[args.dtype])
        load_seconds = time.perf_counter() - t0
        variants = [] if (args.no_dense and prunes) else [(label, dense, None)]
        for method, pattern in prunes:
            model = copy.deepcopy(dense)
            info = prune_in_memory(model, tokenizer, method, pattern, args)
            variants.append((f"{label} {method} {pattern}", model, info))
        for name, model, info in variants:
            row = {"label": name, "model": source, "pruned_in_memory": info, "load_seconds": load_seconds}
            if args.ppl_windows > 0:
                row["perplexity"] = perplexity_of(model, tokenizer, args)
                row["ppl"] = row["perplexity"]["ppl"]
            elif name in known_ppl:
                row["ppl"] = known_ppl[name]
            elif info is None:
                row["ppl"] = saved_perplexity(source)
            row["zero_shot"] = evaluate_tasks(model, tokenizer, task_names, limit=args.limit,
                                              batch_size=args.batch_size, task_dirs=[args.task_dir])
            rows.append(row)
            print(json.dumps({"label": name, "mean_acc": row["zero_shot"]["mean_acc"],
                              "mean_acc_norm": row["zero_shot"]["mean_acc_norm"], "ppl": row.get("ppl"),
                              "seconds": round(row["zero_shot"]["seconds"], 1)}), flush=True)
            if model is not dense:
                del model

    from pyprune.pipeline.report import versions

    result = {
        "harness_version": harness_version(),
        "tasks": task_names,
        "task_dir": os.path.abspath(args.task_dir),
        "settings": {k: v for k, v in vars(args).items()},
        "rows": rows,
        "ordering_agrees_with_perplexity": {m: ordering_agrees(rows, m) for m in ("mean_acc", "mean_acc_norm")},
        "versions": dict(versions(), lm_eval=harness_version()),
        "threads": torch.get_num_threads(),
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=2)
    table = format_table({r["label"]: r["zero_shot"] for r in rows})
    lines = ["# Zero-shot accuracy (lm-evaluation-harness bridge)", "", table, "",
             "| model | ppl | eval seconds |", "|---|---|---|"]
    for r in rows:
        ppl = f"{r['ppl']:.2f}" if r.get("ppl") is not None else "-"
        lines.append(f"| {r['label']} | {ppl} | {r['zero_shot']['seconds']:.1f} |")
    agrees = result["ordering_agrees_with_perplexity"]
    lines += ["", "Accuracy ordering agrees with perplexity ordering: " + (
        "n/a (fewer than 2 perplexities)" if agrees["mean_acc"] is None
        else f"acc {agrees['mean_acc']}, acc_norm {agrees['mean_acc_norm']}") + ".",
              f"Tasks: {', '.join(task_names)} (from {result['task_dir']}); "
              f"{torch.get_num_threads()} CPU threads, batch size {args.batch_size}."]
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
