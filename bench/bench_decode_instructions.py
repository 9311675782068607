"""Instructions per stored weight in the main loop of the decode kernels, from the real compiler
output for an H100 (sm_90), without a GPU.

At M = 1 the gemv kernels are limited by instructions, not bytes: an H100 issues about 3.3e13
thread instructions per second, so streaming INT4 at 3 TB/s (6e12 weights/s) leaves about 5.5
instructions per weight. This benchmark compiles each format's gemv kernel (CUDA cores, M <= 16)
and its tensor-core decode kernels (``split``, ``rows`` at M = 16) with Triton's compiler and
ptxas (fp16 activations, G = 128, K a multiple of BLOCK_K), disassembles the cubin with
``cuobjdump -sass``, finds the main K loop (the longest backward branch) and counts its
instructions per thread, divided by the weights one thread handles per iteration
(``BLOCK_N * BLOCK_K / threads`` for INT4, half that for the kept values of 2:4 formats).
Int-to-float conversions (``I2F``) are counted apart too: they issue at a quarter of the rate.

    python bench/bench_decode_instructions.py [--tag NAME]

Writes ``bench/results/decode_instructions[_NAME].json`` and ``.md``. It is a proxy: it says
nothing about memory latency or occupancy; the serving benchmark on a GPU is the measurement.
"""
import argparse
import collections
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("unset TRITON_INTERPRET: this benchmark compiles the kernels")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402


KERNELS = {  # format -> (module, gemv kernel name, stored weights per column of K)
    "int4": ("int4_matmul", "_int4_gemv_kernel", 1.0),
    "2:4": ("sparse24_matmul", "_sparse24_gemv_kernel", 0.5),
    "2:4-int4": ("sparse24_int4_matmul", "_sparse24_int4_gemv_kernel", 0.5),
}
# (variant, BLOCK_M, BLOCK_N, BLOCK_K): the gemv default at M = 1, narrower tiles, the M = 4 / 16
# candidates, and the tensor-core decode kernels at M = 16.
TILES = [("gemv", 1, 16, 1024), ("gemv", 1, 8, 1024), ("gemv", 1, 16, 512), ("gemv", 4, 16, 512),
         ("gemv", 4, 8, 512), ("gemv", 16, 8, 256), ("split", 16, 64, 128), ("rows", 16, 64, 128),
         ("rows", 16, 128, 128)]
NUM_WARPS = 4
GROUPSIZE = 128


def compile_decode(kernel, block_m, block_n, block_k, arch=90):
    """The kernel compiled for ``sm_<arch>`` (signature from its parameters, so older and newer
    versions of a kernel compile alike)."""
    values = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "SPLIT_K": 4, "HAS_BIAS": False,
              "EVEN_K": True, "GROUPSIZE": GROUPSIZE, "VALUE_DTYPE": tl.float16, "GROUP_M": 8, "UPCAST": False}
    sig, consts = {}, {}
    for p in kernel.params:
        if p.is_constexpr:
            sig[p.name] = "constexpr"
            consts[p.name] = values[p.name]
        elif p.name in ("x_ptr", "y_ptr", "bias_ptr", "s_ptr"):
            sig[p.name] = "*fp16"
        elif p.name == "ws_ptr":
            sig[p.name] = "*fp32"
        elif p.name == "qb_ptr":
            sig[p.name] = "*u8"
        elif p.name.endswith("_ptr"):
            sig[p.name] = "*i32"
        elif p.name == "tiles_per_group":
            sig[p.name] = "i32"
        else:
            sig[p.name] = "i32"
    src = ASTSource(fn=kernel, signature=sig, constexprs=consts)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": NUM_WARPS, "num_stages": 3})


def main_loop_ops(compiled) -> collections.Counter:
    """Opcode counts of the longest loop (backward branch) of the kernel's SASS."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, check=True).stdout
    code = []
    for line in sass.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)(\.[\w.]+)?\s*(.*)", line)
        if m:
            code.append((int(m.group(1), 16), m.group(2), m.group(4)))
    loop = None
    for addr, op, args in code:
        target = re.search(r"0x([0-9a-f]+)", args) if op == "BRA" else None
        if target and int(target.group(1), 16) < addr:
            span = (int(target.group(1), 16), addr)
            if loop is None or span[1] - span[0] > loop[1] - loop[0]:
                loop = span
    if loop is None:
        raise RuntimeError("no loop found in the kernel's SASS")
    return collections.Counter(op for addr, op, _ in code if loop[0] <= addr <= loop[1])


def measure():
    rows = []
    for fmt, (module, name, stored) in KERNELS.items():
        kernels = importlib.import_module(f"pyprune.triton_kernels.{module}")
        for variant, bm, bn, bk in TILES:
            kernel = getattr(kernels, name) if variant == "gemv" else kernels._KERNELS[variant]
            ops = main_loop_ops(compile_decode(kernel, bm, bn, bk))
            weights = bn * bk * stored / (32 * NUM_WARPS)
            total = sum(ops.values())
            rows.append({"format": fmt, "variant": variant, "block_m": bm, "block_n": bn, "block_k": bk,
                         "instructions": total, "per_stored_weight": total / weights,
                         "i2f_per_stored_weight": ops["I2F"] / weights, "top": ops.most_common(8)})
            print(f"{fmt:8s} {variant:5s} M-tile {bm:2d} BN {bn:3d} BK {bk:4d}: {total / weights:6.2f} per stored "
                  f"weight (I2F {ops['I2F'] / weights:.2f})", flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tag", default="", help="suffix of the result files, named in them (e.g. the commit whose "
                    "kernels are measured: run with that checkout first on PYTHONPATH)")
    args = ap.parse_args()
    rows = measure()
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                       "decode_instructions" + (f"_{args.tag}" if args.tag else ""))
    meta = {"triton": triton.__version__, "arch": "sm_90", "num_warps": NUM_WARPS, "groupsize": GROUPSIZE}
    with open(out + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    lines = [f"# Decode kernels: SASS instructions per stored weight in the main loop (sm_90, Triton {triton.__version__})",
             "", "`python bench/bench_decode_instructions.py`: compiled, not run (no GPU needed). fp16 activations, "
             f"G = {GROUPSIZE}, {NUM_WARPS} warps; stored weight = one INT4 code, or one kept value of a 2:4 format."
             + (f" Kernels of: {args.tag}." if args.tag else ""),
             "", "| format | variant | BLOCK_M | BLOCK_N | BLOCK_K | instructions / iteration / thread | "
             "per stored weight | of which I2F | most frequent |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        top = ", ".join(f"{op} {n}" for op, n in r["top"][:5])
        lines.append(f"| {r['format']} | {r['variant']} | {r['block_m']} | {r['block_n']} | {r['block_k']} | "
                     f"{r['instructions']} | {r['per_stored_weight']:.2f} | {r['i2f_per_stored_weight']:.2f} | {top} |")
    with open(out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {out}.json and {out}.md")


if __name__ == "__main__":
    main()
