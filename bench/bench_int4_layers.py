"""Layer-level INT4 comparison: relative reconstruction error of RTN, GPTQ and GPTQ with act-order
at group sizes 32/64/128/per-channel, and of SparseGPT 50 % + INT4 in one sweep versus SparseGPT
50 % followed by mask-preserving GPTQ; each INT4 configuration with min-max scales and with the
"mse" scale search (``... mse``); GPTQ act-order, the joint sweep and act-order mask-GPTQ also
followed by 4 rounds of code and scale refinement (``... + refine``).

Inputs: real activations of SmolLM2-135M (a safetensors copy in --model-dir, default
/tmp/smol_st) on C4 windows from /work/shared/data/c4, captured with forward pre-hooks; half of
the windows give the calibration Hessian, the other half a held-out Hessian. Without the model,
random correlated inputs of the same widths are used (the report says which).

Metric: ``tr(dW H dW^T) / tr(W H W^T)`` with ``dW`` against the dense weight, i.e. the relative
squared output error of the layer, on held-out tokens (``heldout``) and calibration tokens
(``calib``). Sparse rows include the pruning error.

    python bench/bench_int4_layers.py                 # ~1-3 min on 2 CPU cores
    python bench/bench_int4_layers.py --random        # no model needed
    python bench/bench_int4_layers.py --only g64      # configurations whose name has "g64"

Writes bench/results/int4_layers.json and bench/results/int4_layers.md.
"""
import argparse
import json
import math
import os
import random
import sys
import time

import torch

from pyprune.ops.hessian import accumulate_hessian
from pyprune.ops.int4_grid import SCALE_FITS
from pyprune.solvers import sparsegpt
from pyprune.solvers.base import LayerStats
from pyprune.solvers.compressed_size import layer_storage
from pyprune.solvers.pattern import SparsityPattern
from pyprune.solvers.quantize import prune_and_quantize, quantize_layer

GROUPSIZES = (32, 64, 128, -1)
SPARSE_GROUPSIZES = (64, 128, -1)
REFINE_ROUNDS = 4  # "+ refine": codes and scales refined after the sweep (pyprune.ops.int4_refine)
C4 = "/work/shared/data/c4/c4-sample-200docs.jsonl"


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", default="/tmp/smol_st")
    p.add_argument("--random", action="store_true", help="use random correlated inputs even if the model exists")
    p.add_argument("--layers", default="2,12", help="decoder layer indices")
    p.add_argument("--linears", default="self_attn.q_proj,self_attn.o_proj,mlp.up_proj,mlp.down_proj")
    p.add_argument("--windows", type=int, default=8, help="C4 windows (half calibration, half held out)")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", default="", help="comma-separated substrings: run only configurations naming one")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    return p.parse_args()


class _Stop(Exception):
    pass


def _stop(*_):
    raise _Stop


def real_layers(args):
    """name -> (W, H_calib, H_heldout) from the model on C4 windows, or None without the model."""
    if args.random or not os.path.isfile(os.path.join(args.model_dir, "config.json")):
        return None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    # Enough documents for ~4x the tokens needed (tokenizing all of them costs more than it adds).
    docs, chars = [], 0
    with open(C4) as f:
        for line in f:
            docs.append(json.loads(line)["text"])
            chars += len(docs[-1])
            if chars > 16 * args.windows * args.seqlen:
                break
    ids = tokenizer("\n\n".join(docs), return_tensors="pt").input_ids[0]
    random.seed(args.seed)
    starts = [random.randint(0, ids.numel() - args.seqlen - 1) for _ in range(args.windows)]
    windows = torch.stack([ids[s:s + args.seqlen] for s in starts])
    names = [f"model.layers.{i}.{lin}" for i in map(int, args.layers.split(",")) for lin in args.linears.split(",")]
    modules = dict(model.named_modules())
    sums = {name: [None, 0, None, 0] for name in names}  # H_cal, n_cal, H_eval, n_eval
    phase = {"slot": 0}

    def hook(name):
        def fold(_module, inputs):
            x = inputs[0].detach().float().reshape(-1, inputs[0].shape[-1])
            entry = sums[name]
            slot = phase["slot"]
            if entry[slot] is None:
                entry[slot] = torch.zeros(x.shape[1], x.shape[1])
            entry[slot + 1] = accumulate_hessian(entry[slot], entry[slot + 1], x)
        return fold

    handles = [modules[name].register_forward_pre_hook(hook(name)) for name in names]
    # Stop each forward pass after the last decoder layer of interest.
    last = model.model.layers[max(map(int, args.layers.split(",")))]
    handles.append(last.register_forward_hook(_stop))
    with torch.no_grad():
        for k, window in enumerate(windows):
            phase["slot"] = 0 if k < args.windows // 2 else 2
            try:
                model(window.unsqueeze(0))
            except _Stop:
                pass
    for h in handles:
        h.remove()
    return {name: (modules[name].weight.data.float().clone(), LayerStats(e[0], e[1]), LayerStats(e[2], e[3]))
            for name, e in sums.items()}


def random_layers(args):
    """Correlated random inputs with the widths of SmolLM2-135M's Linears."""
    shapes = {"self_attn.q_proj": (576, 576), "self_attn.o_proj": (576, 576), "mlp.up_proj": (1536, 576),
              "mlp.down_proj": (576, 1536)}
    g = torch.Generator().manual_seed(args.seed)
    layers = {}
    for i in map(int, args.layers.split(",")):
        for lin in args.linears.split(","):
            rows, cols = shapes[lin]
            mix = torch.randn(cols, cols, generator=g) / cols ** 0.5 + 0.3 * torch.eye(cols)
            col_scale = torch.rand(cols, generator=g).mul(3).add(0.2)
            stats = []
            for _ in range(2):
                n = args.windows // 2 * args.seqlen
                X = torch.randn(n, cols, generator=g).matmul(mix) * col_scale
                H = torch.zeros(cols, cols)
                stats.append(LayerStats(H, accumulate_hessian(H, 0, X)))
            W = torch.randn(rows, cols, generator=g) * 0.05
            layers[f"model.layers.{i}.{lin}"] = (W, stats[0], stats[1])
    return layers


def rel_error(W, W_new, H):
    dW = W - W_new.float()
    return float(torch.sum(dW.matmul(H.H) * dW) / torch.sum(W.matmul(H.H) * W))


def gs_label(g):
    return "per-channel" if g == -1 else f"g{g}"


def config_tag(g, fit):
    """"g64" for min-max scales, else "g64 <fit>" ("g64 mse", "g64 signed", ...)."""
    return gs_label(g) if fit == "minmax" else f"{gs_label(g)} {fit}"


def config_order():
    """Every config name in table order (a layer whose width every group size divides)."""
    return [name for name, _ in configs_for(torch.zeros(1, 1536), None)]


def configs_for(W, cal):
    """(config name, callable -> (weight, pruned mask or None, groupsize or None))."""
    cols = W.shape[1]
    half = SparsityPattern(0.5)
    out = []
    for g in GROUPSIZES:
        if g != -1 and cols % g:
            continue
        for fit in SCALE_FITS:
            tag = config_tag(g, fit)
            out.append((f"RTN {tag}", lambda g=g, fit=fit: quantize_layer(W, cal, method="rtn", groupsize=g,
                                                                          scale_fit=fit)))
            out.append((f"GPTQ {tag}", lambda g=g, fit=fit: quantize_layer(W, cal, method="gptq", groupsize=g,
                                                                           scale_fit=fit)))
            out.append((f"GPTQ act-order {tag}",
                        lambda g=g, fit=fit: quantize_layer(W, cal, method="gptq", groupsize=g, act_order=True,
                                                            scale_fit=fit)))
            out.append((f"GPTQ act-order {tag} + refine",
                        lambda g=g, fit=fit: quantize_layer(W, cal, method="gptq", groupsize=g, act_order=True,
                                                            scale_fit=fit, refine_rounds=REFINE_ROUNDS)))
    out.append(("SparseGPT 50% (no INT4, fp16 values)", lambda: sparsegpt.solve(W, cal, half)))
    for g in SPARSE_GROUPSIZES:
        if g != -1 and cols % g:
            continue
        for fit in SCALE_FITS:
            tag = config_tag(g, fit)
            out.append((f"SparseGPT 50% + INT4 joint {tag}",
                        lambda g=g, fit=fit: prune_and_quantize(W, cal, half, groupsize=g, scale_fit=fit)))
            out.append((f"SparseGPT 50% + INT4 joint {tag} + refine",
                        lambda g=g, fit=fit: prune_and_quantize(W, cal, half, groupsize=g, scale_fit=fit,
                                                                refine_rounds=REFINE_ROUNDS)))
            out.append((f"SparseGPT 50% then mask-GPTQ {tag}",
                        lambda g=g, fit=fit: _sparse_then_quantize(W, cal, half, g, "gptq", fit)))
            out.append((f"SparseGPT 50% then mask-GPTQ act-order {tag} + refine",
                        lambda g=g, fit=fit: _sparse_then_quantize(W, cal, half, g, "gptq", fit, act_order=True,
                                                                   refine_rounds=REFINE_ROUNDS)))
            out.append((f"SparseGPT 50% then RTN {tag}",
                        lambda g=g, fit=fit: _sparse_then_quantize(W, cal, half, g, "rtn", fit)))
    return out


_sparse_cache = {}


def _sparse(W, cal, pattern):
    key = id(W)
    if key not in _sparse_cache:
        _sparse_cache.clear()
        _sparse_cache[key] = sparsegpt.solve(W, cal, pattern)
    return _sparse_cache[key]


def _sparse_then_quantize(W, cal, pattern, g, method, fit, **options):
    s = _sparse(W, cal, pattern)
    return quantize_layer(s.weight, cal, method=method, groupsize=g, pruned=s.pruned, scale_fit=fit, **options)


def main():
    args = parse_args()
    torch.manual_seed(args.seed)
    t0 = time.time()
    layers = real_layers(args)
    source = f"SmolLM2-135M ({args.model_dir}) on {args.windows} C4 windows x {args.seqlen} tokens"
    if layers is None:
        layers = random_layers(args)
        source = "random correlated inputs (no model found)"
    print(f"inputs: {source} ({time.time() - t0:.1f}s)", file=sys.stderr)
    rows = []
    for name, (W, cal, heldout) in layers.items():
        for config, run in configs_for(W, cal):
            if args.only and not any(part in config for part in args.only.split(",")):
                continue
            t = time.time()
            r = run()
            pruned = getattr(r, "pruned", None)
            g = getattr(r, "groupsize", None)
            cost = layer_storage(W.shape, wbits=4 if g else 16, groupsize=g or 128,
                                 pruned=pruned if pruned is not None and pruned.any() else None)
            rows.append({
                "layer": name, "shape": list(W.shape), "config": config,
                "heldout": rel_error(W, r.weight, heldout), "calib": rel_error(W, r.weight, cal),
                "sparsity": float(pruned.float().mean()) if pruned is not None else 0.0,
                "bits_per_weight": cost.bits_per_weight, "seconds": time.time() - t,
            })
        print(f"{name}: done ({time.time() - t0:.1f}s)", file=sys.stderr)
        # Written after every Linear, so a run cut short keeps what it measured.
        md = write(args, source, rows, time.time() - t0, list(layers))
    print(md)


def write(args, source, rows, seconds, planned):
    os.makedirs(args.out, exist_ok=True)
    report = {"source": source, "config": vars(args), "seconds": seconds, "planned_layers": planned,
              "summary": summarise(rows), "rows": rows}
    with open(os.path.join(args.out, "int4_layers.json"), "w") as f:
        json.dump(report, f, indent=1)
    md = markdown(report)
    with open(os.path.join(args.out, "int4_layers.md"), "w") as f:
        f.write(md)
    return md


def summarise(rows):
    """Per config: geometric mean of the relative errors over the layers where it applies."""
    out = {}
    order = {name: k for k, name in enumerate(config_order())}
    for config in sorted(dict.fromkeys(r["config"] for r in rows), key=lambda c: order.get(c, len(order))):
        sel = [r for r in rows if r["config"] == config]
        out[config] = {
            "layers": len(sel),
            "heldout_geomean": math.exp(sum(math.log(max(r["heldout"], 1e-30)) for r in sel) / len(sel)),
            "calib_geomean": math.exp(sum(math.log(max(r["calib"], 1e-30)) for r in sel) / len(sel)),
            "bits_per_weight": sum(r["bits_per_weight"] for r in sel) / len(sel),
        }
    return out


def markdown(report):
    rows, summary = report["rows"], report["summary"]
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    short = [name.replace("model.layers.", "L").replace("self_attn.", "").replace("mlp.", "") for name in layers]
    lines = [
        "# INT4 layer-level reconstruction error",
        "",
        f"Inputs: {report['source']}. Relative output error `tr(dW H dW^T)/tr(W H W^T)` x 1e3 on "
        "held-out tokens (lower is better); `mean` = geometric mean over the layers where the group "
        "size divides the width (g128 applies only to down_proj, whose width is 1536; the others are 576 "
        f"wide). {len(layers)} of {len(report['planned_layers'])} planned Linears measured; "
        f"total time {report['seconds']:.0f} s.",
        "",
        "| config | bits/weight | " + " | ".join(short) + " | mean (heldout) | mean (calib) |",
        "| --- | ---: | " + " | ".join("---:" for _ in short) + " | ---: | ---: |",
    ]
    for config, s in summary.items():
        cells = []
        for layer in layers:
            hit = [r for r in rows if r["layer"] == layer and r["config"] == config]
            cells.append(f"{hit[0]['heldout'] * 1e3:.2f}" if hit else "n/a")
        lines.append(f"| {config} | {s['bits_per_weight']:.3f} | " + " | ".join(cells) +
                     f" | {s['heldout_geomean'] * 1e3:.2f} | {s['calib_geomean'] * 1e3:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
