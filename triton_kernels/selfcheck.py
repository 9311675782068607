"""Check every compiled kernel against the exact reference on the local GPU.

``python -m pyprune.triton_kernels.selfcheck`` (needs CUDA; run without ``TRITON_INTERPRET``):
for each format, activation dtype, a spread of M (decode and prefill) and every kernel variant,
compares with ``x.float() @ W^T`` rounded to the activation dtype and prints the relative error;
exits 1 if any exceeds 1e-3. The kernels that expand a packed weight to dense must match the
formats' exact unpacking to the last bit, and split-K partials summed in the kernel must match
the reduction launch to the last bit. Also exercises the tuner (``config=None``) on the first
shape, at a decode, a boundary and a prefill M: each tuned call compiles and times every
candidate, which would make the check take many minutes if done for every case.
"""
import sys
from dataclasses import replace

import torch

from pyprune.formats import pack_sparse24, quantize_int4, quantize_sparse24_int4

from . import sparse_tensor_cores, tile_counters
from ._common import DENSE_VARIANTS, KernelConfig, interpreting
from .int4_matmul import int4_dequantize, int4_matmul
from .sparse24_int4_matmul import sparse24_int4_dequantize, sparse24_int4_matmul
from .sparse24_matmul import sparse24_matmul, sparse24_to_dense


def _prune(w):
    n, k = w.shape
    g = w.reshape(n, k // 4, 4)
    return g.scatter(2, g.abs().argsort(-1)[..., :2], 0.0).reshape(n, k)


def _cases(n, k, g, dtype, device):
    w = _prune(torch.randn(n, k, device=device))
    p24 = pack_sparse24(w.to(dtype))
    p4 = quantize_int4(torch.randn(n, k, device=device), g)
    p244 = quantize_sparse24_int4(w, g)
    return [
        ("2:4", p24.dense(), lambda x, b, c: sparse24_matmul(x, p24.values, p24.meta, b, config=c)),
        ("int4", p4.dense(), lambda x, b, c: int4_matmul(x, p4.qweight, p4.scales, g, b, config=c)),
        ("2:4-int4", p244.dense(), lambda x, b, c: sparse24_int4_matmul(x, p244.qvalues, p244.meta, p244.scales, g, b, config=c)),
    ]


def _expand_failures(n, k, g, dtype, device) -> int:
    """The expand kernels (the dense variant's first step) against the formats' exact unpacking:
    equal to the last bit."""
    w = _prune(torch.randn(n, k, device=device))
    p24 = pack_sparse24(w.to(dtype))
    p4 = quantize_int4(torch.randn(n, k, device=device), g)
    p244 = quantize_sparse24_int4(w, g)
    pairs = {
        "2:4": (sparse24_to_dense(p24.values, p24.meta), p24.dense(dtype)),
        "int4": (int4_dequantize(p4.qweight, p4.scales, g, dtype), p4.dense().to(dtype)),
        "2:4-int4": (sparse24_int4_dequantize(p244.qvalues, p244.meta, p244.scales, g, dtype), p244.dense().to(dtype)),
    }
    failures = 0
    for name, (expanded, exact) in pairs.items():
        if not torch.equal(expanded, exact):
            failures += 1
            print(f"FAIL expand {name} {dtype} n={n} k={k} g={g}: "
                  f"{int((expanded != exact).sum())} of {exact.numel()} weights differ", flush=True)
    return failures


def _in_kernel_reduction_failures(dev) -> int:
    """Split-K partials summed in the kernel (``reduce_in_kernel``) against the reduction launch:
    equal to the last bit, call after call (eager and replayed in a CUDA graph), with every tile
    counter back to zero; the 4096 x 4096 weight gives hundreds of programs racing to finish."""
    n, k, g = 4096, 4096, 128
    # Every variant stores through the same store_result: one on the CUDA cores, one with wgmma.
    configs = [KernelConfig(1, 16, 512, split_k=8, variant="gemv"),
               KernelConfig(16, 64, 128, split_k=8, variant="rows", weight_left=True)]
    failures = 0
    for dtype in (torch.float16, torch.bfloat16):
        for name, _, fn in _cases(n, k, g, dtype, dev):
            for cfg in configs:
                m = cfg.block_m
                x = torch.randn(m, k, device=dev, dtype=dtype)
                b = torch.randn(n, device=dev, dtype=dtype)
                expected = fn(x, b, cfg)
                in_kernel = replace(cfg, reduce_in_kernel=True)
                outputs = [fn(x, b, in_kernel) for _ in range(20)]
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    captured = fn(x, b, in_kernel)
                for _ in range(20):
                    graph.replay()
                    outputs.append(captured.clone())
                torch.cuda.synchronize()
                differ = sum(not torch.equal(y, expected) for y in outputs)
                busy = sum(int(c.count_nonzero()) for _, c in tile_counters._COUNTERS.values())
                if differ or busy:
                    failures += 1
                    print(f"FAIL in-kernel reduction {name} {dtype} {cfg}: {differ} of {len(outputs)} calls "
                          f"differ from the reduction launch; {busy} counters not zero", flush=True)
    print("in-kernel split-K reduction checked", flush=True)
    return failures


def main() -> int:
    if interpreting() or not torch.cuda.is_available():
        print("selfcheck needs a CUDA GPU and TRITON_INTERPRET unset")
        return 2
    dev = torch.device("cuda")
    torch.manual_seed(0)
    configs = [None,
               KernelConfig(16, 64, 128, split_k=4, variant="split"),
               KernelConfig(16, 32, 64, split_k=3, variant="tile"),
               KernelConfig(4, 32, 128, split_k=3, variant="gemv"),
               KernelConfig(8, 16, 64, split_k=2, num_warps=8, variant="gemv"),
               KernelConfig(1, 512, 128, split_k=4, variant="gemv"),  # the 2:4 + INT4 default, M = 1
               KernelConfig(2, 256, 256, split_k=3, variant="gemv"),  # the INT4 default, M <= 2
               KernelConfig(16, 64, 128, split_k=3, variant="rows"),
               KernelConfig(64, 128, 64, num_warps=4, num_stages=3, variant="rows"),
               KernelConfig(64, 64, 64, num_warps=4, num_stages=3),
               KernelConfig(128, 128, 64, num_warps=8, num_stages=3),
               KernelConfig(256, 128, 64, num_warps=8, num_stages=3, variant="rows"),
               KernelConfig(128, 128, 64, num_warps=8, num_stages=3, variant="rows", fold_scales=True),
               KernelConfig(16, 64, 128, split_k=3, variant="rows", weight_left=True),
               KernelConfig(16, 128, 128, split_k=2, variant="rows", weight_left=True),  # fewest instructions, M <= 16
               KernelConfig(128, 128, 64, num_warps=8, num_stages=3, variant="rows", weight_left=True),
               KernelConfig(256, 128, 64, num_warps=8, num_stages=3, variant="rows", fold_scales=True,
                            weight_left=True),
               KernelConfig(128, 128, 64, variant="dense"),
               KernelConfig(128, 256, 64, variant="dense_chunks"),  # 256 rows at a time, the last partial
               KernelConfig(128, 128, 64, variant=sparse_tensor_cores.VARIANT)]
    if not sparse_tensor_cores.library_available():
        print("cuSPARSELt is not available: the cusparselt variant is not checked", flush=True)
    tuned_shape, tuned_m = (1000, 1024, 128), (1, 16, 300)
    worst, failures = 0.0, 0
    for n, k, g in (tuned_shape, (4096, 4096, 128), (384, 2048, 64)):
        for dtype in (torch.float16, torch.bfloat16):
            failures += _expand_failures(n, k, g, dtype, dev)
            for name, dense, fn in _cases(n, k, g, dtype, dev):
                for m in (1, 3, 16, 17, 300):
                    x = torch.randn(m, k, device=dev, dtype=dtype)
                    b = torch.randn(n, device=dev, dtype=dtype)
                    ref = (x.float() @ dense.t() + b.float()).to(dtype).float()
                    for cfg in configs:
                        if cfg is None and ((n, k, g) != tuned_shape or m not in tuned_m):
                            continue
                        if cfg is not None and cfg.variant in ("split", "gemv") and m > cfg.block_m:
                            continue
                        if cfg is not None and name != "2:4" and g % cfg.block_k:
                            continue
                        if cfg is not None and cfg.fold_scales and (name == "2:4" or dtype != torch.float16):
                            continue
                        if (cfg is not None and cfg.variant in DENSE_VARIANTS and name != "2:4"
                                and dtype != torch.float16):
                            continue  # a weight rounded to bf16: not offered by the tuner
                        if cfg is not None and cfg.variant == sparse_tensor_cores.VARIANT and (
                                name == "int4" or sparse_tensor_cores.unsupported_reason(n, k, dtype, dev)):
                            continue
                        try:
                            y = fn(x, b, cfg).float()
                        except Exception as exc:  # noqa: BLE001 - reported, and the other cases still run
                            failures += 1
                            print(f"FAIL {name} {dtype} n={n} k={k} g={g} m={m} {cfg}: {exc!r}", flush=True)
                            continue
                        err = float((y - ref).norm() / ref.norm())
                        worst = max(worst, err)
                        if not err < 1e-3:
                            failures += 1
                            print(f"FAIL {name} {dtype} n={n} k={k} g={g} m={m} {cfg}: rel err {err:.2e}", flush=True)
        print(f"shape {n}x{k} g={g} done; worst so far {worst:.2e}", flush=True)
    failures += _in_kernel_reduction_failures(dev)
    print(f"worst relative error {worst:.2e}; {failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
