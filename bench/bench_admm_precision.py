"""ADMM solve (20 iterations, 50 % unstructured, no final solve) with fp32, TF32 and fp16 iteration
matmuls on LLaMA-7B layer shapes: median time and the layer loss of each, on the local GPU.

Besides the whole solve (normalisation, inverse, iterations, loss), each precision's time is split
into its parts: the penalised inverse ``(Hd + rho I)^-1`` (fp32, shared by all precisions), the 20
iterations alone (the ADMM steps and primal matmuls, i.e. ``_admm`` minus the inverse), and the
fp32 layer loss.

    python bench/bench_admm_precision.py [--shapes 4096x11008 11008x4096] [--out bench/results]

The Hessian comes from correlated inputs (2048 tokens through a random mixing matrix), so the
loss reflects a realistic spectrum. Writes admm_precision_<device>.json and .md.
"""
import argparse
import json
import os
import statistics
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from pyprune.solvers import admm  # noqa: E402
from pyprune.solvers.base import LayerStats, reconstruction_loss  # noqa: E402
from pyprune.solvers.pattern import SparsityPattern  # noqa: E402


def layer(out, inp, device):
    g = torch.Generator(device=device).manual_seed(0)
    mix = torch.randn(inp, inp, generator=g, device=device) / inp ** 0.5 + torch.eye(inp, device=device)
    X = torch.randn(2048, inp, generator=g, device=device) @ mix
    H = 2.0 * X.t() @ X / X.shape[0]
    W = torch.randn(out, inp, generator=g, device=device)
    return W, LayerStats(H=H, nsamples=2048)


def timed(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        a.record()
        result = fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times), result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", nargs="*", default=["4096x11008", "11008x4096", "4096x4096"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU (TF32 is a tensor-core mode); nothing measured")
        return 2
    dev = torch.device("cuda")
    rows = []
    for shape in args.shapes:
        out, inp = (int(v) for v in shape.split("x"))
        W, stats = layer(out, inp, dev)
        row = {"shape": shape}
        pattern = SparsityPattern(0.5)
        problem = admm._normalise(W, stats.H, 0.1)
        row["inverse_ms"], _ = timed(lambda: admm._penalised_inverse(problem.Hd, 1.0), args.repeats)
        row["loss_ms"], _ = timed(lambda: reconstruction_loss(W, W * 0.5, stats.H), args.repeats)
        for precision in admm.PRECISIONS:
            ms, res = timed(lambda: admm.solve(W, stats, pattern, final_solve=False,
                                               precision=precision), args.repeats)
            row[f"{precision}_ms"], row[f"{precision}_loss"] = ms, res.loss
            row[f"{precision}_pruned"] = res.pruned
            with admm.tf32_matmuls(precision == "tf32"):
                admm_ms, _ = timed(lambda: admm._admm(problem, pattern, None, 20, 15, 1.0, False, "final",
                                                      precision), args.repeats)
            row[f"{precision}_iterations_ms"] = admm_ms - row["inverse_ms"]
        fp32_pruned = row.pop("fp32_pruned")
        for precision in admm.PRECISIONS[1:]:
            row[f"{precision}_mask_agreement"] = float((row.pop(f"{precision}_pruned") == fp32_pruned).float().mean())
            row[f"{precision}_loss_ratio"] = row[f"{precision}_loss"] / row["fp32_loss"]
        rows.append(row)
        print(f"{shape}: " + "; ".join(
            f"{p} {row[p + '_ms']:.1f} ms (iterations {row[p + '_iterations_ms']:.1f})" for p in admm.PRECISIONS)
            + f"; inverse {row['inverse_ms']:.1f} ms, loss {row['loss_ms']:.1f} ms; " + "; ".join(
            f"loss {p}/fp32 {row[p + '_loss_ratio']:.5f}, masks agree {row[p + '_mask_agreement']:.4%}"
            for p in admm.PRECISIONS[1:]), flush=True)
    device = torch.cuda.get_device_name(0)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "admm_precision_gpu.json"), "w") as f:
        json.dump({"device": device, "torch": torch.__version__, "rows": rows}, f, indent=1)
    lines = [f"# ADMM iteration precision ({device})", "",
             f"torch {torch.__version__}; 20 iterations (15 gradual mask steps), 50 % unstructured, no final solve; "
             f"median of {args.repeats}. Whole solve = normalisation + inverse + iterations + fp32 loss; the "
             "iterations column is the 20 ADMM steps and primal matmuls alone.", "",
             "| shape (out x in) | precision | whole solve ms | 20 iterations ms | inverse ms | loss ms | "
             "loss / fp32 | masks agree with fp32 |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        for p in admm.PRECISIONS:
            ratio = "1" if p == "fp32" else f"{r[p + '_loss_ratio']:.5f}"
            agree = "-" if p == "fp32" else f"{r[p + '_mask_agreement']:.4%}"
            lines.append(f"| {r['shape']} | {p} | {r[p + '_ms']:.1f} | {r[p + '_iterations_ms']:.1f} | "
                         f"{r['inverse_ms']:.1f} | {r['loss_ms']:.1f} | {ratio} | {agree} |")
    with open(os.path.join(args.out, "admm_precision_gpu.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
