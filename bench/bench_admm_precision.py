"""ADMM solve (20 iterations, 50 % unstructured, no final solve) with fp32 and TF32 iteration
matmuls on LLaMA-7B layer shapes: median time and the layer loss of each, on the local GPU.

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
from pyprune.solvers.base import LayerStats  # noqa: E402
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
        for precision in admm.PRECISIONS:
            ms, res = timed(lambda: admm.solve(W, stats, SparsityPattern(0.5), final_solve=False,
                                               precision=precision), args.repeats)
            row[f"{precision}_ms"], row[f"{precision}_loss"] = ms, res.loss
            row[f"{precision}_pruned"] = res.pruned
        row["mask_agreement"] = float((row.pop("fp32_pruned") == row.pop("tf32_pruned")).float().mean())
        row["loss_ratio"] = row["tf32_loss"] / row["fp32_loss"]
        rows.append(row)
        print(f"{shape}: fp32 {row['fp32_ms']:.1f} ms, tf32 {row['tf32_ms']:.1f} ms; "
              f"loss tf32/fp32 {row['loss_ratio']:.5f}; masks agree on {row['mask_agreement']:.4%}", flush=True)
    device = torch.cuda.get_device_name(0)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "admm_precision_gpu.json"), "w") as f:
        json.dump({"device": device, "torch": torch.__version__, "rows": rows}, f, indent=1)
    lines = [f"# ADMM iteration precision ({device})", "",
             f"torch {torch.__version__}; 20 iterations (15 gradual mask steps), 50 % unstructured, no final solve; "
             f"median of {args.repeats}.", "",
             "| shape (out x in) | fp32 ms | tf32 ms | loss tf32 / fp32 | masks agree |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['fp32_ms']:.1f} | {r['tf32_ms']:.1f} | {r['loss_ratio']:.5f} | "
                     f"{r['mask_agreement']:.4%} |")
    with open(os.path.join(args.out, "admm_precision_gpu.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
