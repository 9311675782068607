"""Layer-level effect of --sink-cap: the error of INT4 (and of SparseGPT 50 % + INT4) on the first
token and on all other tokens of held-out windows, with the calibration Hessian built three ways.

A Linear whose input carries a massive activation on the first token (SmolLM2-135M's layer-11
down_proj) has a Hessian made of that token alone, whatever the sink weight; GPTQ then fits that
token and leaves the others to chance. ``--sink-cap`` shrinks the first row to the median row
length of its window before the sink weight (``pyprune.pipeline.statistics.sink_weighted_rows``).

Inputs: SmolLM2-135M (safetensors copy in --model-dir, default /tmp/smol_st) on C4 windows; the
first half of the windows calibrates, the second half is held out. Metric: ``tr(dW H dW^T) /
tr(W H W^T)`` against the dense weight, with ``H`` of the held-out first tokens (``sink``) or of
every other held-out token (``rest``). Sparse rows include the pruning error; the SparseGPT mask
comes from the same Hessian as the INT4 step.

    python bench/bench_sink_cap_layers.py        # ~4 min on one CPU thread

Writes bench/results/sink_cap_layers.json and .md.
"""
import argparse
import json
import os
import time

import torch

from pyprune.ops.hessian import accumulate_hessian
from pyprune.pipeline.statistics import sink_weighted_rows
from pyprune.solvers import sparsegpt
from pyprune.solvers.base import LayerStats
from pyprune.solvers.pattern import SparsityPattern
from pyprune.solvers.quantize import quantize_layer

C4 = "/work/shared/data/c4/c4-sample-200docs.jsonl"
HESSIANS = {"sink 1": (1.0, False), "sink 256": (256.0, False), "sink 256 + cap": (256.0, True)}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", default="/tmp/smol_st")
    p.add_argument("--linears", default="11:mlp.down_proj,12:mlp.down_proj,20:mlp.down_proj,2:self_attn.q_proj,"
                                        "5:self_attn.o_proj", help="LAYER:NAME, comma-separated")
    p.add_argument("--windows", type=int, default=16, help="C4 windows (half calibration, half held out)")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--groupsize", type=int, default=64)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    return p.parse_args()


def captured_inputs(args, targets):
    """``(layer, name) -> [window inputs [seq, features]]`` and the dense weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    with open(C4) as f:
        text = "\n\n".join(json.loads(line)["text"] for line in f)
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    inputs, weights, handles = {t: [] for t in targets}, {}, []
    for key in targets:
        module = model.model.layers[key[0]].get_submodule(key[1])
        weights[key] = module.weight.detach().float().clone()
        handles.append(module.register_forward_pre_hook(lambda m, i, key=key: inputs[key].append(i[0][0].detach())))
    with torch.no_grad():
        for k in range(args.windows):
            model(ids[k * args.seqlen:(k + 1) * args.seqlen].unsqueeze(0))
    for h in handles:
        h.remove()
    return inputs, weights


def hessian(windows, sink_weight=1.0, sink_cap=False):
    """``(2/n) sum x x^T`` over ``[seq, features]`` windows, each weighted as the pipeline does."""
    H, n = torch.zeros(windows[0].shape[-1], windows[0].shape[-1]), 0
    for x in windows:
        n = accumulate_hessian(H, n, sink_weighted_rows(x[None], sink_weight, sink_cap))
    return H


def relative_error(W, W_new, H):
    d = W - W_new
    return float(torch.trace(d @ H @ d.T) / torch.trace(W @ H @ W.T))


def main():
    args = parse_args()
    targets = [(int(a), b) for a, b in (item.split(":") for item in args.linears.split(","))]
    t0 = time.time()
    inputs, weights = captured_inputs(args, targets)
    rows = []
    for key in targets:
        half = args.windows // 2
        calib, held = inputs[key][:half], inputs[key][half:]
        held_sink, held_rest = hessian([x[:1] for x in held]), hessian([x[1:] for x in held])
        W = weights[key]
        rows.append({"linear": f"{key[0]}.{key[1]}", "config": "RTN", "hessian": "-",
                     **_errors(W, quantize_layer(W, None, method="rtn", groupsize=args.groupsize).weight,
                               held_sink, held_rest)})
        for label, (weight, cap) in HESSIANS.items():
            stats = LayerStats(hessian(calib, weight, cap), 1)
            q = quantize_layer(W, stats, method="gptq", groupsize=args.groupsize, act_order=True, refine_rounds=4)
            rows.append({"linear": f"{key[0]}.{key[1]}", "config": "GPTQ act-order + refine", "hessian": label,
                         **_errors(W, q.weight, held_sink, held_rest)})
            pruned = sparsegpt.solve(W, stats, SparsityPattern(sparsity=0.5))
            rows.append({"linear": f"{key[0]}.{key[1]}", "config": "SparseGPT 50 %", "hessian": label,
                         **_errors(W, pruned.weight, held_sink, held_rest)})
            q = quantize_layer(pruned.weight, stats, method="gptq", groupsize=args.groupsize, act_order=True,
                               refine_rounds=4, pruned=pruned.pruned, refine_target=W)
            rows.append({"linear": f"{key[0]}.{key[1]}", "config": "SparseGPT 50 % + INT4 (refined to original)",
                         "hessian": label, **_errors(W, q.weight, held_sink, held_rest)})
        print(key, "done", flush=True)
    seconds = time.time() - t0
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "sink_cap_layers.json"), "w") as f:
        json.dump({"args": vars(args), "seconds": seconds, "rows": rows}, f, indent=1)
    lines = ["# --sink-cap at layer level (SmolLM2-135M, C4, CPU)", "",
             f"{args.windows // 2} calibration + {args.windows // 2} held-out windows of {args.seqlen} tokens; "
             f"INT4 g{args.groupsize}; {seconds:.0f} s. Relative output error against the dense weight on the "
             "held-out windows' first tokens ('sink') and on all their other tokens ('rest').", "",
             "| Linear | configuration | calibration Hessian | sink | rest |", "|---|---|---|---|---|"]
    lines += [f"| {r['linear']} | {r['config']} | {r['hessian']} | {r['sink']:.2e} | {r['rest']:.2e} |" for r in rows]
    with open(os.path.join(args.out, "sink_cap_layers.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def _errors(W, W_new, held_sink, held_rest):
    return {"sink": relative_error(W, W_new, held_sink), "rest": relative_error(W, W_new, held_rest)}


if __name__ == "__main__":
    main()
