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
