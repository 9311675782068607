"""How much the first token of each calibration window should weigh in the statistics.

A quick proxy of P1 on smollm2-135m, cheap enough to sweep ``--sink-weight``: the statistics of
every Linear are collected once from the dense model (32 C4 windows of 2048 tokens, as in P1),
kept as two sums per input (all tokens; position-0 tokens only), and every configuration then
solves all Linears from the dense inputs at once (not sequentially) and is evaluated on the
first ``--eval-windows`` WikiText-2 test windows of 2048 tokens.

    python bench/bench_sink_weight.py [--eval-windows 8] [--configs "rtn;gptq:1;gptq:256;sparsegpt:256"]

A configuration is ``solver:weight`` with solver in rtn, gptq (INT4, group 64), sparsegpt, wanda
(50 %). Results: ``bench/results/sink_weight_quick.{json,md}``.
"""
import argparse
import json
import os
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
DATA = os.environ.get("PYPRUNE_DATA_DIR", os.path.join(HERE, "..", "..", "shared", "data"))
DEFAULT_CONFIGS = ("dense;rtn;gptq:1;gptq:64;gptq:256;gptq:2048;sparsegpt:1;sparsegpt:64;sparsegpt:256;"
                   "sparsegpt:2048;wanda:1;wanda:256;wanda:2048")
# q/k/v read one input, gate/up another: one set of sums per distinct input.
READS_INPUT_OF = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}


def collect(model, tokens):
    """Per distinct Linear input: (sum over all tokens of x x^T, the same over position 0), float32."""
    from pyprune.models.families import decoder_layers

    sums, handles = {}, []

    def hook(name):
        def fold(module, args):
            x = args[0].detach()
            every, first = x.reshape(-1, x.shape[-1]).float(), x[:, 0].float()
            a, b = sums.get(name, (0.0, 0.0))
            sums[name] = (a + every.T @ every, b + first.T @ first)
        return fold

    for index, layer in enumerate(decoder_layers(model)):
        for name, module in layer.named_modules():
            if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] not in READS_INPUT_OF:
                handles.append(module.register_forward_pre_hook(hook(f"{index}.{name}")))
    with torch.no_grad():
        for i in range(tokens.shape[0]):
            model(input_ids=tokens[i:i + 1])
    for handle in handles:
        handle.remove()
    return sums


def apply(model, config, sums):
    """Solve every Linear of ``model`` in place for ``config`` ("solver:weight")."""
    from pyprune.models.families import decoder_layers
    from pyprune.solvers import SparsityPattern, get_solver, gptq, rtn
    from pyprune.solvers.base import LayerStats

    solver, _, weight = config.partition(":")
    weight = float(weight or 1)
    for index, layer in enumerate(decoder_layers(model)):
        for name, module in layer.named_modules():
            if not isinstance(module, torch.nn.Linear):
                continue
            parent, leaf = name.rsplit(".", 1)
            every, first = sums[f"{index}.{parent}.{READS_INPUT_OF.get(leaf, leaf)}"]
            stats = LayerStats(every + (weight - 1.0) * first)  # scale is irrelevant: damping is relative
            W = module.weight.data
            if solver == "rtn":
                result = rtn.solve(W, None, groupsize=64)
            elif solver == "gptq":
                result = gptq.solve(W, stats, groupsize=64)
            else:
                result = get_solver(solver)(W, stats, SparsityPattern(sparsity=0.5))
            module.weight.data = result.weight.to(W.dtype)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default=DEFAULT_CONFIGS)
    p.add_argument("--eval-windows", type=int, default=8)
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--data-dir", default=DATA)
    args = p.parse_args()
    from pyprune.data.calibration import calibration_tokens, evaluation_tokens
    from pyprune.eval.perplexity import perplexity
    from pyprune.models.loading import load_model

    model, tokenizer = load_model("smollm2-135m")
    t0 = time.time()
    sums = collect(model, calibration_tokens(tokenizer, "c4", args.nsamples, 2048, 0, args.data_dir))
    collect_seconds = time.time() - t0
    stream = evaluation_tokens(tokenizer, args.data_dir)
    rows = []
    for config in args.configs.split(";"):
        model, _ = load_model("smollm2-135m")
        t0 = time.time()
        if config != "dense":
            apply(model, config, sums)
        solve_seconds = time.time() - t0
        ppl = perplexity(model, stream, 2048, max_windows=args.eval_windows, progress=False)["ppl"]
        rows.append({"config": config, "ppl": ppl, "solve_seconds": solve_seconds})
        print(json.dumps(rows[-1]), flush=True)
    out = {"calibration": f"c4 {args.nsamples}x2048 (seed 0), dense inputs", "eval_windows": args.eval_windows,
           "collect_seconds": collect_seconds, "threads": torch.get_num_threads(), "rows": rows}
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "sink_weight_quick.json"), "w") as f:
        json.dump(out, f, indent=1)
    lines = ["# Sink weight, quick proxy (bench/bench_sink_weight.py)", "",
             f"smollm2-135m fp32; statistics of {out['calibration']}; every Linear solved from the dense inputs "
             f"at once; WikiText-2 test, first {args.eval_windows} windows of 2048 tokens. gptq = INT4 group 64; "
             "sparsegpt and wanda at 50 %. 'solver:W' = the first token of each window counted as W tokens.", "",
             "| configuration | ppl |", "|---|---|"]
    lines += [f"| {r['config']} | {r['ppl']:.2f} |" for r in rows]
    with open(os.path.join(RESULTS, "sink_weight_quick.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
