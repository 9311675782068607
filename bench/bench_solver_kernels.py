"""Solver kernels of ``pyprune._C`` against their PyTorch references, on LLaMA layer shapes.

For every layer shape ``[out, in]`` (LLaMA-7B: 4096x4096, 4096x11008, 11008x4096; LLaMA-70B:
8192x8192, 28672x8192) it times, with the kernel and with ``PYPRUNE_FORCE_REFERENCE=1``:

* ``accumulate_hessian``: one batch of 2048 bf16 tokens folded into H [in, in];
* ``inverse_hessian_factor``: dead columns, dampening, U = chol((H + damp I)^-1, upper);
* ``obs_block``: one 128-column block of the OBS sweep over all ``out`` rows (the fused kernel vs
  the reference column loop), 2:4 on the updated weights;
* ``obs_sweep``: the whole sweep (blocks + the lazy GEMM), unstructured 50 % and 2:4 + INT4 g128;
* ``sparsegpt``: the whole SparseGPT solve (factor + sweep) of the layer, 50 %;
* ``admm_step``: one projection + dual step (per-layer top-k at 50 %, and 2:4);
* ``admm_solve``: the ADMM solver, 20 iterations (15 with a gradual mask), 50 % unstructured.

Median wall time over repeats (CUDA events around each call, after a warm-up). Results go to
``bench/results/solver_kernels_<device>.json`` and ``.md``. Without a GPU only the reference half
runs, on CPU, at shapes divided by ``--cpu-scale`` (default 16, rounded to multiples of 128),
with fewer repeats, and the kernel half is marked skipped: a check of the script, not numbers.

    python bench/bench_solver_kernels.py                       # GPU: all shapes
    python bench/bench_solver_kernels.py --shapes 4096x4096 --repeats 5
"""
import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from pyprune.ops import _extension  # noqa: E402
from pyprune.ops.admm_step import admm_step  # noqa: E402
from pyprune.ops.hessian import accumulate_hessian, inverse_hessian_factor  # noqa: E402
from pyprune.ops.obs_sweep import QuantSpec, _sweep_block, obs_sweep  # noqa: E402

LLAMA_SHAPES = ["4096x4096", "4096x11008", "11008x4096", "8192x8192", "28672x8192"]
TOKENS = 2048


@contextlib.contextmanager
def reference_forced(on):
    old = os.environ.get(_extension.FORCE_REFERENCE_ENV)
    if on:
        os.environ[_extension.FORCE_REFERENCE_ENV] = "1"
    else:
        os.environ.pop(_extension.FORCE_REFERENCE_ENV, None)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(_extension.FORCE_REFERENCE_ENV, None)
        else:
            os.environ[_extension.FORCE_REFERENCE_ENV] = old


def timed(fn, device, repeats, warmup=1, budget_s=60.0):
    """Median milliseconds of ``fn()`` (stops early once ``budget_s`` is spent, at least 1 run)."""
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        if time.perf_counter() - start > budget_s:
            break
    return statistics.median(times), len(times)


def hessian_of(cols, device):
    X = torch.randn(4 * cols if device.type == "cpu" else TOKENS, cols, device=device)
    H = 2.0 * X.t() @ X / X.shape[0]
    return H


def cases(out, inp, device):
    """(name, setup) pairs; setup() returns the function to time (inputs built once)."""
    def acc():
        H = hessian_of(inp, device)
        x = torch.randn(TOKENS if device.type == "cuda" else 256, inp, device=device, dtype=torch.bfloat16)
        return lambda: accumulate_hessian(H, 100, x)

    def factor():
        H = hessian_of(inp, device)
        return lambda: inverse_hessian_factor(H, 0.01)

    def block():
        H = hessian_of(inp, device)
        U = inverse_hessian_factor(H, 0.01).U
        W = torch.randn(out, inp, device=device)
        count = min(128, inp)
        U1 = U[:count, :count]

        def run():
            W1 = W[:, :count].clone()
            prune1 = torch.zeros(out, count, dtype=torch.bool, device=device)
            _sweep_block(W1, U1, prune1, (2, 4), None, None, W, 0, count, None)
        return run

    def sweep(**kw):
        def setup():
            H = hessian_of(inp, device)
            U = inverse_hessian_factor(H, 0.01).U
            W = torch.randn(out, inp, device=device)
            return lambda: obs_sweep(W, U, **kw)
        return setup

    def sparsegpt():
        from pyprune.solvers import sparsegpt as sg
        from pyprune.solvers.base import LayerStats
        from pyprune.solvers.pattern import SparsityPattern

        stats = LayerStats(H=hessian_of(inp, device), nsamples=TOKENS)
        W = torch.randn(out, inp, device=device, dtype=torch.float16 if device.type == "cuda" else torch.float32)
        return lambda: sg.solve(W, stats, SparsityPattern(sparsity=0.5))

    def step(**sel):
        def setup():
            W = torch.randn(out, inp, device=device)
            U0 = 0.1 * torch.randn(out, inp, device=device)
            s = dict(sel)
            if "k" in s:
                s["k"] = int(0.5 * out * inp)
            return lambda: admm_step(W, U0.clone(), 1.0, **s)
        return setup

    def admm_solve():
        from pyprune.solvers import admm
        from pyprune.solvers.base import LayerStats
        from pyprune.solvers.pattern import SparsityPattern

        stats = LayerStats(H=hessian_of(inp, device), nsamples=TOKENS)
        W = torch.randn(out, inp, device=device)
        return lambda: admm.solve(W, stats, SparsityPattern(sparsity=0.5), iters=20, final_solve=False)

    return [
        ("accumulate_hessian bf16", acc),
        ("inverse_hessian_factor", factor),
        ("obs_block 2:4 (one block)", block),
        ("obs_sweep 50%", sweep(sparsity=0.5)),
        ("obs_sweep 2:4 + int4 g128", sweep(nm=(2, 4), quant=QuantSpec(groupsize=min(128, inp)))),
        ("sparsegpt solve 50%", sparsegpt),
        ("admm_step layer 50%", step(k=0)),
        ("admm_step 2:4", step(nm=(2, 4))),
        ("admm solve 20 iters 50%", admm_solve),
    ]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", nargs="*", default=LLAMA_SHAPES, help="layer shapes OUTxIN")
    p.add_argument("--repeats", type=int, default=None, help="default 10 on GPU, 2 on CPU")
    p.add_argument("--only", nargs="*", default=None, help="run only cases whose name starts with one of these")
    p.add_argument("--cpu-scale", type=int, default=16, help="without a GPU, divide both dims by this")
    p.add_argument("--budget", type=float, default=None, help="seconds per case and path (default 60 GPU, 3 CPU)")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    args = p.parse_args(argv)

    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    args.repeats = args.repeats or (10 if gpu else 2)
    args.budget = args.budget or (60.0 if gpu else 3.0)
    ext = _extension.load_extension()
    kernel_note = None
    if not gpu:
        kernel_note = "skipped: no GPU (reference half run on CPU at reduced shapes)"
    elif ext is None:
        kernel_note = f"skipped: pyprune._C not available ({_extension.extension_error()})"
    print(f"device: {torch.cuda.get_device_name() if gpu else platform.processor() or 'cpu'}; "
          f"kernels: {kernel_note or 'pyprune._C'}")
    torch.backends.cuda.matmul.allow_tf32 = False

    rows = []
    for shape in args.shapes:
        out, inp = (int(v) for v in shape.lower().split("x"))
        if not gpu:  # reduced, kept multiples of 128 (INT4 groups and OBS blocks)
            out, inp = (max(128, round(v / args.cpu_scale / 128) * 128) for v in (out, inp))
        for name, setup in cases(out, inp, device):
            if args.only and not any(name.startswith(o) for o in args.only):
                continue
            row = {"shape": f"{out}x{inp}", "case": name}
            for path, forced in (("reference", True), ("kernel", False)):
                if path == "kernel" and kernel_note:
                    row["kernel_ms"] = None
                    continue
                torch.manual_seed(0)
                with reference_forced(forced):
                    fn = setup()
                    ms, n = timed(fn, device, args.repeats, warmup=1 if gpu else 0, budget_s=args.budget)
                row[f"{path}_ms"], row[f"{path}_runs"] = ms, n
                del fn
                if gpu:
                    torch.cuda.empty_cache()
            if row.get("kernel_ms"):
                row["speedup"] = row["reference_ms"] / row["kernel_ms"]
            rows.append(row)
            print(f"{row['shape']:>12} {name:<28} reference {row['reference_ms']:10.2f} ms   kernel "
                  + (f"{row['kernel_ms']:10.2f} ms  x{row['speedup']:.1f}" if row.get("kernel_ms") else "skipped"),
                  flush=True)

    tag = "gpu" if gpu else "cpu"
    os.makedirs(args.out, exist_ok=True)
    meta = {
        "device": torch.cuda.get_device_name() if gpu else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "extension": None if ext is None else ext.build_info(),
        "kernel_half": kernel_note or "run",
        "tokens_per_batch": TOKENS if gpu else 256,
        "repeats": args.repeats,
        "note": None if gpu else f"CPU run: shapes divided by {args.cpu_scale}; reference half only.",
    }
    with open(os.path.join(args.out, f"solver_kernels_{tag}.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    lines = [
        f"# Solver kernels vs PyTorch reference ({meta['device']})",
        "",
        f"torch {meta['torch']}, CUDA {meta['cuda']}; median of up to {args.repeats} runs. "
        + (meta["note"] or "") + (f" Kernel half {kernel_note}." if kernel_note else ""),
        "",
        "| shape | case | reference ms | kernel ms | speedup |",
        "|---|---|---:|---:|---:|",
    ]
    for r in rows:
        k = f"{r['kernel_ms']:.2f}" if r.get("kernel_ms") else "skipped"
        s = f"{r['speedup']:.1f}x" if r.get("speedup") else "-"
        lines.append(f"| {r['shape']} | {r['case']} | {r['reference_ms']:.2f} | {k} | {s} |")
    with open(os.path.join(args.out, f"solver_kernels_{tag}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {args.out}/solver_kernels_{tag}.json and .md")


if __name__ == "__main__":
    main()
