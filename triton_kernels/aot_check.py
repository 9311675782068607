"""Compile every matmul kernel for a GPU architecture without needing that GPU.

``python -m pyprune.triton_kernels.aot_check [--arch 90 80] [--all]`` runs the real Triton
compiler (TTIR -> PTX -> cubin with the bundled ptxas) on the kernel configurations the wrappers
use, so a construct that only the interpreter accepts, or a configuration that needs more shared
memory than the GPU has, fails here. Prints shared memory, registers and spills per
configuration. Must run without ``TRITON_INTERPRET`` (it needs compiled, not interpreted, kernels).
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import replace

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("aot_check: unset TRITON_INTERPRET (kernels must be JIT functions, not interpreted)")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from ._common import WHOLE_WEIGHT_VARIANTS, KernelConfig, _splitk_reduce_kernel, expand_blocks  # noqa: E402
from .int4_matmul import _KERNELS as INT4_KERNELS, _int4_dequant_kernel, _int4_gemv_kernel, int4_limits  # noqa: E402
from .sparse24_int4_matmul import (  # noqa: E402
    _KERNELS as SPARSE24_INT4_KERNELS, _sparse24_int4_dequant_kernel, _sparse24_int4_gemv_kernel,
    sparse24_int4_limits, spread_base_last,
)
from .sparse24_matmul import (  # noqa: E402
    _KERNELS as SPARSE24_KERNELS, LIMITS as SPARSE24_LIMITS, _sparse24_dense_kernel, _sparse24_gemv_kernel,
)

SHARED_LIMIT = {80: 166912, 90: 232448}  # bytes per block (opt-in maximum)


def _matmul_signature(kernel, act: str, value: str):
    ints = {"M", "N", "K", "tiles_per_group", "magic", "one", "first_bits", "second_bits"}
    ints |= {n for n in kernel.arg_names if n.startswith("stride")}
    sig = {}
    for name in kernel.arg_names:
        if name in ints:
            sig[name] = "i32"
        elif name in ("x_ptr", "y_ptr"):
            sig[name] = f"*{act}"
        elif name == "bias_ptr":
            sig[name] = f"*{act}"
        elif name == "ws_ptr":
            sig[name] = "*fp32"
        elif name == "val_ptr":
            sig[name] = f"*{value}"
        elif name == "s_ptr":
            sig[name] = "*fp16"
        elif name.endswith("_ptr"):
            sig[name] = "*i32"
        else:
            sig[name] = "constexpr"
    return sig


def launch_specialization(kernel, sig) -> dict:
    """What a launch tells the compiler: pointers 16-byte aligned, and the shapes and strides
    multiples of 16 (as in LLaMA-size layers; the JIT marks such arguments ``tt.divisibility``
    16, which enables vector loads and asynchronous copies). ``M`` and the small scalar
    arguments are left general."""
    sizes = {"N", "K"} | {n for n in kernel.arg_names if n.startswith("stride")}
    return {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names)
            if sig[name].startswith("*") or name in sizes}


def compile_matmul(kernel, cfg: KernelConfig, act: str, arch: int, value: str = None, even_k: bool = True):
    sig = _matmul_signature(kernel, act, value or act)
    consts = {
        "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k,
        "SPLIT_K": cfg.split_k, "GROUP_M": cfg.group_m, "HAS_BIAS": False, "UPCAST": False,
        # The gemv kernels' (G = 128, as the representative configurations; a ragged case is
        # ragged in both K and N).
        "GROUPSIZE": 128, "EVEN_K": even_k, "EVEN_N": even_k,
        "SUB_K": min(128, cfg.block_k),
        "FOLD_SCALES": cfg.fold_scales, "W_LEFT": cfg.weight_left, "BASE_LAST": spread_base_last(cfg),
    }
    # Tile counters are passed only where the kernel sums the split-K partials (None otherwise).
    consts["REDUCE_IN_KERNEL"] = cfg.reduce_in_kernel and cfg.split_k > 1
    if not consts["REDUCE_IN_KERNEL"]:
        sig["done_ptr"], consts["done_ptr"] = "constexpr", None
    consts = {name: value for name, value in consts.items() if name in kernel.arg_names}
    if "tiles_per_group" in kernel.arg_names and cfg.block_k == 128:
        # One K tile per group of 128: a launch passes 1, which Triton specializes as a constant.
        sig["tiles_per_group"] = "constexpr"
        consts["tiles_per_group"] = 1
    if "VALUE_DTYPE" in kernel.arg_names:
        consts["VALUE_DTYPE"] = {"fp16": tl.float16, "bf16": tl.bfloat16}[value or act]
    src = ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=launch_specialization(kernel, sig))
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})


def compile_other(kernel, sig, consts, arch):
    src = ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=launch_specialization(kernel, sig))
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": 4, "num_stages": 1})


CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def cuobjdump(compiled, flag: str, check: bool = False) -> str:
    """``cuobjdump <flag>`` on the kernel's cubin (cuobjdump ships with Triton)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        return subprocess.run([CUOBJDUMP, flag, f.name], capture_output=True, text=True, check=check).stdout


def resource_usage(compiled) -> str:
    """Registers, stack (where ptxas spills registers) and local memory per thread, from the
    cubin."""
    if not os.path.exists(CUOBJDUMP):
        return "regs=?"
    m = re.search(r"REG:(\d+) STACK:(\d+).*?LOCAL:(\d+)", cuobjdump(compiled, "-res-usage"))
    return f"regs={m.group(1)} stack={m.group(2)} local={m.group(3)}" if m else "regs=?"


def expand_kernels(dtype: str):
    """(kernel, signature, constants) of the kernels that expand a packed weight to a dense one
    with ``dtype`` ("fp16", "bf16") elements, with the tile the wrappers launch at G = 128."""
    tile = dict(zip(("BLOCK_N", "BLOCK_K"), expand_blocks()))
    sizes = {"N": "i32", "K": "i32", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"}
    return [
        (_int4_dequant_kernel, dict(sizes, qw_ptr="*i32", s_ptr="*fp16", out_ptr=f"*{dtype}", stride_qn="i32",
                                    stride_sg="i32", GROUPSIZE="i32"), tile),
        (_sparse24_dense_kernel, dict(sizes, pair_ptr="*i32", meta_ptr="*i32", out_ptr=f"*{dtype}", stride_pn="i32",
                                      stride_mg="i32", VALUE_DTYPE="constexpr"),
         dict(tile, VALUE_DTYPE={"fp16": tl.float16, "bf16": tl.bfloat16}[dtype])),
        (_sparse24_int4_dequant_kernel, dict(sizes, qv_ptr="*i32", meta_ptr="*i32", s_ptr="*fp16", out_ptr=f"*{dtype}",
                                             stride_qn="i32", stride_mg="i32", stride_sg="i32", GROUPSIZE="i32"), tile),
    ]


def representative_configs(full: bool, limits, act: str):
    """The heuristic defaults of both paths (G = 128) and a wide prefill tile, and with ``full``
    every tuning candidate (at M = 1, 4, 16 and 2048) for a format of these ``limits`` and
    activations ``act``."""
    import torch

    from ._common import candidate_configs

    scaled = limits.scaled
    if not full:
        cfgs = [KernelConfig(16, 64, 128, split_k=4, num_warps=4, num_stages=3, variant="split"),
                KernelConfig(16, 64, 128, split_k=4, num_warps=4, num_stages=3, variant="tile"),
                KernelConfig(16, 64, 128, split_k=4, num_warps=4, num_stages=3, variant="rows"),
                KernelConfig(128, 128, 64, split_k=1, num_warps=8, num_stages=3, variant="rows"),
                KernelConfig(64, 128, 64, num_warps=4, num_stages=3, variant="rows"),  # a row per thread
                KernelConfig(256, 128, 128, split_k=1, num_warps=8, num_stages=2, variant="rows"),
                KernelConfig(128, 128, 32, split_k=1, num_warps=8, num_stages=3),  # tile: groups of 32
                KernelConfig(1, limits.gemv_block_n[0], limits.gemv_block_k[0], split_k=4, variant="gemv")]
        if limits.gemv_max_m >= 16:
            cfgs.append(KernelConfig(16, 8, 256, split_k=4, num_warps=4, num_stages=3, variant="gemv"))
        cfgs += [KernelConfig(16, 64, 128, split_k=4, num_warps=4, num_stages=3, variant="rows", weight_left=True),
                 KernelConfig(128, 128, 64, num_warps=8, num_stages=3, variant="rows", weight_left=True)]
        # Split-K partials summed in the kernel (the tuner's second pass), on the CUDA and tensor cores.
        cfgs += [KernelConfig(16, 64, 128, split_k=4, num_warps=4, num_stages=3, variant="rows", weight_left=True,
                              reduce_in_kernel=True),
                 KernelConfig(1, limits.gemv_block_n[0], limits.gemv_block_k[0], split_k=4, variant="gemv",
                              reduce_in_kernel=True)]
        if scaled and act == "fp16":
            cfgs += [KernelConfig(128, 128, 64, num_warps=8, num_stages=3, variant="rows", fold_scales=True),
                     KernelConfig(128, 128, 64, num_warps=8, num_stages=3, variant="rows", fold_scales=True,
                                  weight_left=True)]
        return cfgs
    cpu = torch.device("cpu")
    cfgs = [c for m in (1, 4, 16, 2048) for c in candidate_configs(m, 4096, 4096, limits, cpu, act == "fp16")]
    cfgs = [c for c in dict.fromkeys(cfgs) if c.variant not in WHOLE_WEIGHT_VARIANTS]  # cuBLAS, cuSPARSELt
    return cfgs + [replace(c, reduce_in_kernel=True) for c in cfgs if c.split_k > 1]  # the tuner's second pass


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[90])
    ap.add_argument("--all", action="store_true", help="every tuning candidate, not just the defaults")
    args = ap.parse_args(argv)
    failures = 0
    kernels = [("2:4", dict(SPARSE24_KERNELS, gemv=_sparse24_gemv_kernel), SPARSE24_LIMITS),
               ("int4", dict(INT4_KERNELS, gemv=_int4_gemv_kernel), int4_limits(128)),
               ("2:4-int4", dict(SPARSE24_INT4_KERNELS, gemv=_sparse24_int4_gemv_kernel), sparse24_int4_limits(128))]
    for arch in args.arch:
        for name, by_variant, limits in kernels:
            for act in ("fp16", "bf16"):
                cases = [(cfg, True) for cfg in representative_configs(args.all, limits, act)]
                cases += [(cfg, False) for cfg, _ in cases if cfg.variant == "gemv"]  # tiles past K's and N's ends
                for cfg, even_k in cases:
                    kernel = by_variant[cfg.variant]
                    tag = f"sm_{arch} {name:8s} {act} {cfg}" + ("" if even_k else " K, N not multiples of the tile")
                    try:
                        c = compile_matmul(kernel, cfg, act, arch, even_k=even_k)
                    except Exception as exc:  # noqa: BLE001 - report and continue
                        failures += 1
                        print(f"FAIL {tag}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
                        continue
                    shared = c.metadata.shared
                    over = shared > SHARED_LIMIT.get(arch, 232448)
                    failures += over
                    print(f"{'OVER' if over else 'ok  '} {tag}: shared={shared} {resource_usage(c)}")
        others = [
            (_splitk_reduce_kernel, {"ws_ptr": "*fp32", "bias_ptr": "*fp16", "y_ptr": "*fp16", "MN": "i32", "N": "i32",
                                     "SPLIT_K": "constexpr", "HAS_BIAS": "constexpr", "BLOCK": "constexpr"},
             {"SPLIT_K": 4, "HAS_BIAS": True, "BLOCK": 1024}),
        ] + expand_kernels("fp16") + expand_kernels("bf16")
        for kernel, sig, consts in others:
            try:
                compile_other(kernel, sig, consts, arch)
                print(f"ok   sm_{arch} {kernel.__name__} {sig['out_ptr' if 'out_ptr' in sig else 'y_ptr']}")
            except Exception as exc:  # noqa: BLE001
                failures += 1
                print(f"FAIL sm_{arch} {kernel.__name__}: {type(exc).__name__}: {exc}")
    print(f"{failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
