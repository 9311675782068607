"""The Triton kernels compile for real GPUs (sm_90, sm_80), not only run in the interpreter.

The interpreter accepts constructs the compiler refuses (a jit helper returning tensors of
different shapes from two branches, ``tl.arange`` with run-time bounds), so every kernel the
wrappers launch is also compiled ahead of time here, in a process without ``TRITON_INTERPRET``
(``pyprune.triton_kernels.aot_check``: Triton's compiler and ptxas, no GPU needed).
"""
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")


def test_kernels_compile_for_sm90_and_sm80():
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, "-m", "pyprune.triton_kernels.aot_check", "--arch", "90", "80"],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "0 failure(s)" in proc.stdout
    assert proc.stdout.count("gemv") >= 12  # the gemv variants of all three formats, both archs and dtypes


@pytest.mark.parametrize("module,kernel,tile", [("int4_matmul", "_int4_gemv_kernel", (64, 256)),
                                                ("sparse24_int4_matmul", "_sparse24_int4_gemv_kernel", (512, 128))])
def test_gemv_keeps_the_decoded_tile_out_of_shared_memory(module, kernel, tile):
    # The decoded codes, x, the metadata and the scales share one register layout, so the
    # compiled loop (sm_90, fp16) converts no layout: no decoded value is written to shared
    # memory and read back between barriers. A regression here costs the decode path its speed,
    # not its accuracy, so no interpreter test would see it.
    code = (
        "from pyprune.triton_kernels.aot_check import compile_matmul\n"
        f"from pyprune.triton_kernels.{module} import {kernel}\n"
        "from pyprune.triton_kernels import KernelConfig\n"
        f"ir = compile_matmul({kernel}, KernelConfig(1, {tile[0]}, {tile[1]}, split_k=4, variant='gemv'), 'fp16', 90)"
        ".asm['ttgir']\n"
        "loop = ir[ir.index('scf.for'):ir.index('scf.yield')]\n"
        "print('conversions in the loop:', loop.count('ttg.convert_layout'))\n"
    )
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "conversions in the loop: 0" in proc.stdout, proc.stdout
