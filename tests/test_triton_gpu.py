"""The compiled Triton kernels on a GPU (the other Triton tests run them under the interpreter).

A separate module: ``tests/test_triton_kernels.py`` is skipped as a whole when ``TRITON_INTERPRET``
is not 1, as on a GPU machine that exports ``TRITON_INTERPRET=0``, and this test must run there.
"""
import os
import subprocess
import sys

import pytest


@pytest.mark.cuda
def test_compiled_kernels_on_gpu():
    """Every variant of every format vs the reference, in a subprocess (TRITON_INTERPRET is fixed
    at import time in this one)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "pyprune.triton_kernels.selfcheck"], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
