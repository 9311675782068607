"""Instructions in the main loop of the packed-weight matmul kernels, from the real compiler
output for an H100 (sm_90), without a GPU.

Decode (M <= 16): at M = 1 the gemv kernels are limited by instructions, not bytes. An H100
issues about 3.3e13 thread instructions per second, so streaming INT4 at 3 TB/s (6e12 weights/s)
leaves about 5.5 instructions per weight. Reported: instructions per stored weight (one INT4
code, or one kept value of a 2:4 format), int-to-float conversions (``I2F``, quarter rate),
barriers per iteration (``BAR``: each one is a layout conversion through shared memory, which
stalls the warps that could otherwise keep loads in flight) and register spills.

Prefill (tensor cores, M >= 64): each program decodes a ``BLOCK_N x BLOCK_K`` weight tile and
multiplies it with ``BLOCK_M`` rows of x. Reported: the loop's warp-instructions over the 4
schedulers of an SM, divided by the tensor-core cycles of its multiply-adds at the dense fp16
peak (989 TFLOPS over 132 SMs at 1.83 GHz: 2048 per cycle per SM). Above 1 the loop cannot keep
the tensor cores busy, whatever the memory system does.

Prefill also reports how many wgmma groups the loop leaves in flight when it waits (from the
TTGIR's ``warp_group_dot_wait``): 0 means the tensor cores and the decoding take turns. With the
decoded tile as the dot's right operand (the default) it goes through shared memory and the wait
is 0; as the left operand (``weight_left``) wgmma reads it from registers, and where the dot
accumulates across K tiles Triton splits it along K and overlaps decoding with the tensor cores.

Expand (the "dense" variant, and the kept values of the 2:4 + INT4 "cusparselt" variant): the
kernels that write a packed weight out as fp16, counted whole (they have no loop) per dense weight.

Each kernel is compiled with Triton's compiler and ptxas as a launch specializes it (pointers
16-byte aligned; N, K and strides multiples of 16), fp16 activations, G = 128, K a multiple of
BLOCK_K; the SASS comes from ``cuobjdump -sass``, and the main loop is the longest backward branch.

    python bench/bench_kernel_instructions.py [--tag NAME]

Writes ``bench/results/kernel_instructions[_NAME].json`` and ``.md``. It is a proxy: it says
nothing about memory latency or occupancy; the serving benchmark on a GPU is the measurement.
"""
import argparse
import collections
import importlib
import json
import os
import re
import sys

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("unset TRITON_INTERPRET: this benchmark compiles the kernels")

import triton  # noqa: E402

from pyprune.triton_kernels import KernelConfig  # noqa: E402
from pyprune.triton_kernels.aot_check import (  # noqa: E402
    compile_matmul, compile_other, cuobjdump, expand_kernels, resource_usage,
)


KERNELS = {  # format -> (module, gemv kernel name, stored weights per column of K, its KernelLimits at G = 128)
    "int4": ("int4_matmul", "_int4_gemv_kernel", 1.0, "int4_limits"),
    "2:4": ("sparse24_matmul", "_sparse24_gemv_kernel", 0.5, "LIMITS"),
    "2:4-int4": ("sparse24_int4_matmul", "_sparse24_int4_gemv_kernel", 0.5, "sparse24_int4_limits"),
}
# The tensor-core decode kernels at M = 16 (variant, BLOCK_M, BLOCK_N, BLOCK_K; 4 warps).
TENSOR_CORE_DECODE_TILES = [("split", 16, 64, 128), ("rows", 16, 64, 128), ("rows", 16, 128, 128),
                            ("rows-left", 16, 64, 128), ("rows-left", 16, 128, 128)]
DECODE_WARPS = 4
# (BLOCK_M, BLOCK_N, BLOCK_K, stages) of the "rows" prefill kernel, 8 warps: the default and the
# tuner's wider tiles; each with the scales folded into the fp16 tile too, for the INT4 formats, and
# with the decoded weight as either operand of the dot.
PREFILL_TILES = [(128, 128, 64, 3), (128, 128, 128, 3), (256, 128, 64, 3), (256, 128, 128, 2)]
PREFILL_WARPS = 8
EXPAND_WARPS = 4  # aot_check.compile_other's, as the wrappers launch the expand kernels
GROUPSIZE = 128  # as aot_check.compile_matmul compiles the gemv kernels
TENSOR_FMA_PER_CYCLE = 2048  # dense fp16 multiply-adds per cycle per SM, H100 SXM
SCHEDULERS = 4  # warp-instructions issued per cycle per SM


def compile_kernel(kernel, block_m, block_n, block_k, num_warps, num_stages=3, fold_scales=False, arch=90,
                   weight_left=False):
    """The kernel compiled for ``sm_<arch>`` as a launch specializes it, fp16 activations (the
    signature and specialization of ``aot_check``)."""
    cfg = KernelConfig(block_m, block_n, block_k, split_k=4 if block_m <= 16 else 1, num_warps=num_warps,
                       num_stages=num_stages, fold_scales=fold_scales, weight_left=weight_left)
    return compile_matmul(kernel, cfg, "fp16", arch)


def wgmma_in_flight(compiled) -> int:
    """The most wgmma groups the kernel leaves running at a wait (0: none; -1: no wgmma)."""
    waits = [int(n) for n in re.findall(r"warp_group_dot_wait .*?pendings = (\d+)", compiled.asm["ttgir"])]
    return max(waits) if waits else -1


def sass_code(compiled) -> list:
    """(address, opcode, operands) of each SASS instruction of the kernel."""
    sass = cuobjdump(compiled, "-sass", check=True)
    code = []
    for line in sass.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)(\.[\w.]+)?\s*(.*)", line)
        if m:
            code.append((int(m.group(1), 16), m.group(2), m.group(4)))
    return code


def main_loop_ops(compiled) -> collections.Counter:
    """Opcode counts of the longest loop (backward branch) of the kernel's SASS."""
    code = sass_code(compiled)
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


def decode_tiles(limits):
    """The format's gemv tuning tiles (M = 1: every row tile with the two first K tiles; M = 2
    with the first K tile; M = 4 and 16 where the tuner offers them), then the tensor-core
    decode kernels."""
    tiles = [("gemv", 1, bn, bk) for bn in limits.gemv_block_n for bk in limits.gemv_block_k[:2]]
    tiles += [("gemv", 2, bn, limits.gemv_block_k[0]) for bn in limits.gemv_block_n]
    if limits.gemv_max_m >= 4:
        tiles += [("gemv", 4, bn, 512) for bn in limits.gemv_block_n[:2]]
    if limits.gemv_max_m >= 16:
        tiles.append(("gemv", 16, 8, 256))
    return tiles + TENSOR_CORE_DECODE_TILES


def format_limits(module, limits_name):
    limits = getattr(module, limits_name)
    return limits(GROUPSIZE) if callable(limits) else limits


def measure_decode():
    rows = []
    for fmt, (module, name, stored, limits_name) in KERNELS.items():
        kernels = importlib.import_module(f"pyprune.triton_kernels.{module}")
        for variant, bm, bn, bk in decode_tiles(format_limits(kernels, limits_name)):
            kernel = getattr(kernels, name) if variant == "gemv" else kernels._KERNELS[variant.split("-")[0]]
            ops = main_loop_ops(compile_kernel(kernel, bm, bn, bk, DECODE_WARPS, weight_left=variant == "rows-left"))
            weights = bn * bk * stored / (32 * DECODE_WARPS)
            total = sum(ops.values())
            rows.append({"format": fmt, "variant": variant, "block_m": bm, "block_n": bn, "block_k": bk,
                         "instructions": total, "per_stored_weight": total / weights,
                         "i2f_per_stored_weight": ops["I2F"] / weights, "barriers": ops["BAR"],
                         "spill_instructions": ops["LDL"] + ops["STL"], "top": ops.most_common(8)})
            print(f"{fmt:8s} {variant:5s} M-tile {bm:2d} BN {bn:3d} BK {bk:4d}: {total / weights:6.2f} per stored "
                  f"weight (I2F {ops['I2F'] / weights:.2f}, BAR {ops['BAR']})", flush=True)
    return rows


def measure_prefill():
    rows = []
    for fmt, (module, *_) in KERNELS.items():
        kernels = importlib.import_module(f"pyprune.triton_kernels.{module}")
        kernel = kernels._KERNELS["rows"]
        folds = (False, True) if "FOLD_SCALES" in kernel.arg_names else (False,)
        lefts = (False, True) if "W_LEFT" in kernel.arg_names else (False,)
        for bm, bn, bk, stages in PREFILL_TILES:
            for left in lefts:
                for fold in folds:
                    compiled = compile_kernel(kernel, bm, bn, bk, PREFILL_WARPS, stages, fold, weight_left=left)
                    ops = main_loop_ops(compiled)
                    total = sum(ops.values())
                    ratio = total * PREFILL_WARPS / SCHEDULERS / (bm * bn * bk / TENSOR_FMA_PER_CYCLE)
                    spills = ops["LDL"] + ops["STL"]
                    rows.append({"format": fmt, "block_m": bm, "block_n": bn, "block_k": bk, "stages": stages,
                                 "fold_scales": fold, "weight_left": left, "instructions": total,
                                 "issue_per_tensor_cycle": ratio, "spill_instructions": spills,
                                 "wgmma_in_flight": wgmma_in_flight(compiled), "top": ops.most_common(8)})
                    print(f"{fmt:8s} rows {bm}x{bn}x{bk}{' fold' if fold else ''}{' left' if left else ''}: "
                          f"{total} per thread, issue / tensor cycles {ratio:.2f}, spills {spills}, "
                          f"wgmma in flight {rows[-1]['wgmma_in_flight']}", flush=True)
    return rows


def measure_expand():
    """The kernels that expand a packed weight to fp16 (the "dense" variant; the INT4 one also
    writes the kept values of the 2:4 + INT4 "cusparselt" variant). They have no loop: the whole
    kernel, per dense weight written."""
    rows = []
    for kernel, sig, consts in expand_kernels("fp16"):
        compiled = compile_other(kernel, sig, consts, 90)
        ops = collections.Counter(op for _, op, _ in sass_code(compiled) if op != "NOP")  # padding after EXIT
        total = sum(ops.values())
        weights = consts["BLOCK_N"] * consts["BLOCK_K"]
        rows.append({"kernel": kernel.__name__, "block_n": consts["BLOCK_N"], "block_k": consts["BLOCK_K"],
                     "instructions": total, "per_weight": total * 32 * EXPAND_WARPS / weights,
                     "barriers": ops["BAR"], "shared": ops["STS"] + ops["LDS"] + ops["LDSM"],
                     "resources": resource_usage(compiled), "top": ops.most_common(8)})
        print(f"{kernel.__name__}: {rows[-1]['per_weight']:.2f} per weight, {rows[-1]['resources']}", flush=True)
    return rows


def table_section(title: str, intro: str, columns: list) -> list:
    """Markdown lines: a section's heading, its explanation and its table's header."""
    return ["", title, "", intro, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tag", default="", help="suffix of the result files, named in them (e.g. the commit whose "
                    "kernels are measured: run with that checkout first on PYTHONPATH)")
    args = ap.parse_args()
    decode, prefill, expand = measure_decode(), measure_prefill(), measure_expand()
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                       "kernel_instructions" + (f"_{args.tag}" if args.tag else ""))
    meta = {"triton": triton.__version__, "arch": "sm_90", "decode_warps": DECODE_WARPS,
            "prefill_warps": PREFILL_WARPS, "groupsize": GROUPSIZE}
    with open(out + ".json", "w") as f:
        json.dump({"meta": meta, "decode": decode, "prefill": prefill, "expand": expand}, f, indent=1)
    lines = [f"# Packed-weight matmul kernels: SASS instructions in the main loop (sm_90, Triton {triton.__version__})",
             "", "`python bench/bench_kernel_instructions.py`: compiled as a launch specializes the kernels, not run "
             f"(no GPU needed). fp16 activations, G = {GROUPSIZE}." + (f" Kernels of: {args.tag}." if args.tag else ""),
             "", f"## Decode ({DECODE_WARPS} warps): per stored weight (one INT4 code, or one kept value of a 2:4 format)",
             "", "| format | variant | BLOCK_M | BLOCK_N | BLOCK_K | instructions / iteration / thread | "
             "per stored weight | of which I2F | barriers / iteration | spill loads + stores | most frequent |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in decode:
        top = ", ".join(f"{op} {n}" for op, n in r["top"][:5])
        lines.append(f"| {r['format']} | {r['variant']} | {r['block_m']} | {r['block_n']} | {r['block_k']} | "
                     f"{r['instructions']} | {r['per_stored_weight']:.2f} | {r['i2f_per_stored_weight']:.2f} | "
                     f"{r['barriers']} | {r['spill_instructions']} | {top} |")
    lines += table_section(
        f"## Prefill, rows kernel ({PREFILL_WARPS} warps): issue cycles per tensor-core cycle",
        f"Warp-instructions of one iteration over {SCHEDULERS} schedulers, divided by the cycles of its "
        f"BLOCK_M x BLOCK_N x BLOCK_K multiply-adds at {TENSOR_FMA_PER_CYCLE} per cycle per SM (dense fp16 "
        "peak). Above 1 the loop cannot keep the tensor cores busy. 'fold': group scales folded into the "
        "fp16 tile (fp16 activations only). 'W operand': the decoded weight tile as the dot's right "
        "operand (through shared memory) or left (wgmma reads it from registers). 'wgmma in flight': "
        "the most wgmma groups left running at a wait (0: decoding and tensor cores take turns).",
        ["format", "tile (M x N x K)", "stages", "scales", "W operand", "instructions / iteration / thread",
         "issue / tensor cycles", "spill loads + stores", "wgmma in flight", "most frequent"])
    for r in prefill:
        top = ", ".join(f"{op} {n}" for op, n in r["top"][:5])
        scales = "-" if r["format"] == "2:4" else ("folded" if r["fold_scales"] else "exact")
        lines.append(f"| {r['format']} | {r['block_m']} x {r['block_n']} x {r['block_k']} | {r['stages']} | {scales} | "
                     f"{'left' if r.get('weight_left') else 'right'} | {r['instructions']} | "
                     f"{r['issue_per_tensor_cycle']:.2f} | {r['spill_instructions']} | {r.get('wgmma_in_flight', '?')} | "
                     f"{top} |")
    lines += table_section(
        f"## Expanding a packed weight to fp16 ({EXPAND_WARPS} warps, no loop): per dense weight written",
        "The whole kernel's instructions times its threads, over the weights of its tile. Writing 2 bytes per "
        "weight at 3 TB/s with 3.3e13 thread instructions per second leaves about 22 instructions per weight "
        "(a little more for the packed bytes read).",
        ["kernel", "BLOCK_N", "BLOCK_K", "instructions / thread", "per weight", "barriers", "shared-memory ops",
         "resources", "most frequent"])
    for r in expand:
        top = ", ".join(f"{op} {n}" for op, n in r["top"][:5])
        lines.append(f"| {r['kernel']} | {r['block_n']} | {r['block_k']} | {r['instructions']} | {r['per_weight']:.2f} | "
                     f"{r['barriers']} | {r['shared']} | {r['resources']} | {top} |")
    with open(out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {out}.json and {out}.md")


if __name__ == "__main__":
    main()
