"""How far the teacher target (``pyprune.ops.teacher``) corrects input drift on held-out tokens, per
dampening of its solve.

Teacher: SmolLM2-135M as it is. Student: the same model with its first ``--quantized-layers``
decoder layers RTN-quantized (INT4 g64), so the inputs of layer ``--layer`` have drifted. For
four of that layer's Linears, ``H`` and the cross term ``C`` are accumulated on calibration windows
(C4, sink weight as given) and the target ``W*`` is solved for each dampening. Reported, per Linear
and dampening: the weight shift ``||W* - W|| / ||W||`` and the drift loss ``||W X~ - W* X||^2``
relative to leaving the weight as it is (``||W X~ - W X||^2``), on the calibration windows and on
held-out windows. Below 1: the target undoes part of the drift; no quantization of ``W*`` is
involved, so this isolates the correction itself.

    python bench/bench_teacher_damp.py          # ~1 min on 2 CPU cores

Writes bench/results/teacher_damp.json and bench/results/teacher_damp.md.
"""
import argparse
import json
import os
import time

import torch

from pyprune.ops.teacher import teacher_target
from pyprune.solvers.quantize import quantize_layer

C4 = "/work/shared/data/c4/c4-sample-200docs.jsonl"
LINEARS = ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj")
DAMPS = (0.01, 0.1, 1.0, 10.0)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", default="/tmp/smol_st")
    p.add_argument("--layer", type=int, default=2)
    p.add_argument("--quantized-layers", type=int, default=2)
    p.add_argument("--windows", type=int, default=8, help="calibration windows (as many again are held out)")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--sink-weight", type=float, default=256.0)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    return p.parse_args()


def c4_windows(tokenizer, count, seqlen):
    docs = []
    with open(C4) as f:
        for line in f:
            docs.append(json.loads(line)["text"])
    ids = tokenizer("\n\n".join(docs), return_tensors="pt").input_ids[0]
    windows = ids[: (len(ids) // seqlen) * seqlen].reshape(-1, seqlen)
    if windows.shape[0] < count:
        raise SystemExit(f"only {windows.shape[0]} windows of {seqlen} tokens in {C4}, need {count}")
    return windows[:count]


def linear_inputs(model, windows, layer):
    """name -> [windows, seqlen, in] inputs of each Linear of decoder layer ``layer``."""
    seen = {name: [] for name in LINEARS}
    hooks = [model.model.layers[layer].get_submodule(name).register_forward_pre_hook(
        lambda module, args, name=name: seen[name].append(args[0].detach().clone())) for name in LINEARS]
    with torch.no_grad():
        for window in windows:
            model(window[None])
    for hook in hooks:
        hook.remove()
    return {name: torch.cat(chunks) for name, chunks in seen.items()}


def rows(x, sink_weight=1.0):
    x = x.clone()
    x[:, 0] *= sink_weight ** 0.5
    return x.reshape(-1, x.shape[-1])


def drift_loss(W, X_teacher, W_student, X_student):
    return float((X_teacher @ W.t() - X_student @ W_student.t()).pow(2).sum())


def main():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    args = parse_args()
    t0 = time.time()
    teacher = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    student = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    for index in range(args.quantized_layers):
        for module in student.model.layers[index].modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.data = quantize_layer(module.weight.data, None, method="rtn", groupsize=64).weight
    windows = c4_windows(AutoTokenizer.from_pretrained(args.model_dir), 2 * args.windows, args.seqlen)
    splits = {"calib": windows[:args.windows], "heldout": windows[args.windows:]}
    inputs = {split: (linear_inputs(teacher, w, args.layer), linear_inputs(student, w, args.layer))
              for split, w in splits.items()}
    results = []
    for name in LINEARS:
        W = teacher.model.layers[args.layer].get_submodule(name).weight.data
        X_teacher, X_student = (rows(x[name], args.sink_weight) for x in inputs["calib"])
        n = X_student.shape[0]
        H = 2.0 / n * X_student.t() @ X_student
        C = 2.0 / n * X_teacher.t() @ X_student
        plain = {split: (rows(inputs[split][0][name]), rows(inputs[split][1][name])) for split in splits}
        for damp in DAMPS:
            target = teacher_target(W, H, C, damp)
            row = {"linear": name, "damp": damp, "shift": float((target - W).norm() / W.norm())}
            for split, (Xt, Xs) in plain.items():
                row[split] = drift_loss(W, Xt, target, Xs) / drift_loss(W, Xt, W, Xs)
            results.append(row)
    report = {"config": vars(args), "seconds": time.time() - t0, "rows": results}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "teacher_damp.json"), "w") as f:
        json.dump(report, f, indent=1)
    lines = [
        "# Teacher target: drift corrected per dampening (SmolLM2-135M, CPU)",
        "",
        f"Student: decoder layers 0..{args.quantized_layers - 1} RTN INT4 g64; Linears of layer {args.layer}; "
        f"{args.windows} calibration + {args.windows} held-out C4 windows of {args.seqlen} tokens; "
        f"sink weight {args.sink_weight:g} in H and C. {report['seconds']:.0f} s.",
        "",
        "'calib' / 'heldout': ||W X~ - W* X||^2 / ||W X~ - W X||^2 (below 1: drift undone); "
        "shift: ||W* - W|| / ||W||.",
        "",
        "| Linear | damp (x mean diag H) | shift | calib | heldout |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {r['linear']} | {r['damp']:g} | {r['shift']:.3f} | {r['calib']:.3f} | {r['heldout']:.3f} |"
              for r in results]
    with open(os.path.join(args.out, "teacher_damp.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
