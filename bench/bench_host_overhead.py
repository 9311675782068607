"""Host time of one packed-weight matmul call, without its kernel launches.

At batch-1 decode every Linear is one call of ``int4_matmul``, ``sparse24_matmul`` or
``sparse24_int4_matmul`` (224 per token for a 32-layer LLaMA), and outside a CUDA graph the
GPU waits for the host between them. This measures the wrappers' own Python work per call
(argument checks, the configuration lookup, output and split-K buffers), with every Triton
launch replaced by a no-op, so it runs on any machine (kernels built by the interpreter, which
is never invoked). Triton's own launch overhead comes on top and is not measured here.
``torch.nn.functional.linear`` on a tiny CPU matrix is timed as a floor for one torch call.

Usage: ``python bench/bench_host_overhead.py [--calls 5000] [--tag NAME]``; writes
``bench/results/host_overhead[_TAG].{json,md}``.
"""
import argparse
import importlib
import json
import os
import platform
import statistics
import subprocess
import time

os.environ.setdefault("TRITON_INTERPRET", "1")  # kernels are never run: no GPU needed

import torch  # noqa: E402

from pyprune.formats import pack_sparse24, quantize_int4, quantize_sparse24_int4  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
MODULES = ("_common", "int4_matmul", "sparse24_matmul", "sparse24_int4_matmul")


class _NoLaunch:
    """Stands in for a Triton kernel: ``kernel[grid](...)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def stub_launches():
    for name in MODULES:
        module = importlib.import_module(f"pyprune.triton_kernels.{name}")
        for attr in list(vars(module)):
            if attr.endswith("_kernel"):
                setattr(module, attr, _NoLaunch())
        for variant in getattr(module, "_KERNELS", {}):
            module._KERNELS[variant] = _NoLaunch()


def cases(n: int, k: int, groupsize: int):
    kernels = importlib.import_module("pyprune.triton_kernels")
    w = torch.randn(n, k)
    groups = w.reshape(n, k // 4, 4)
    w24 = groups.scatter(2, groups.abs().argsort(-1)[..., :2], 0.0).reshape(n, k)
    p4, p24, p244 = quantize_int4(w, groupsize), pack_sparse24(w24.half()), quantize_sparse24_int4(w24, groupsize)
    x = torch.randn(1, k).half()
    tiny_x, tiny_w = torch.randn(1, 64), torch.randn(64, 64)
    return {
        "int4_matmul": lambda: kernels.int4_matmul(x, p4.qweight, p4.scales, groupsize),
        "sparse24_matmul": lambda: kernels.sparse24_matmul(x, p24.values, p24.meta),
        "sparse24_int4_matmul": lambda: kernels.sparse24_int4_matmul(x, p244.qvalues, p244.meta, p244.scales,
                                                                      groupsize),
        "F.linear (1x64 @ 64x64, CPU)": lambda: torch.nn.functional.linear(tiny_x, tiny_w),
    }


def time_us(fn, calls: int, repeats: int = 5) -> float:
    """Median over ``repeats`` runs of the mean host time per call, in microseconds."""
    for _ in range(200):
        fn()
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        runs.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(runs)


def _commit_of(path: str) -> str:
    """The git commit of the tree ``path`` is in ("?" outside a checkout), plus "+" if it has
    changes."""
    folder = os.path.dirname(os.path.realpath(path))
    try:
        head = subprocess.run(["git", "-C", folder, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", folder, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"
    return head + ("+" if dirty else "")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=5000)
    ap.add_argument("--tag", default="", help="suffix of the result files")
    args = ap.parse_args()
    stub_launches()
    rows = {name: time_us(fn, args.calls) for name, fn in cases(4096, 4096, 128).items()}
    meta = {"pyprune commit": _commit_of(importlib.import_module("pyprune.triton_kernels").__file__),
            "torch": torch.__version__, "platform": platform.platform(), "processor": platform.processor(),
            "cpus": os.cpu_count(), "shape": "4096x4096, M = 1, fp16, INT4 g128", "calls": args.calls}
    stem = os.path.join(RESULTS, "host_overhead" + (f"_{args.tag}" if args.tag else ""))
    with open(stem + ".json", "w") as f:
        json.dump({"meta": meta, "us_per_call": rows}, f, indent=1)
    lines = ["# Host time per packed-weight matmul call, kernel launches excluded "
             "(`bench/bench_host_overhead.py`)", "",
             f"pyprune {meta['pyprune commit']}; {meta['shape']}; median of 5 runs of {args.calls} calls; every "
             "Triton launch replaced by a no-op (the wrappers' Python work only). torch " + meta["torch"] + ", " +
             meta["platform"] + f", {meta['cpus']} CPUs.", "", "| call | us per call |", "|---|---|"]
    lines += [f"| {name} | {us:.1f} |" for name, us in rows.items()]
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
