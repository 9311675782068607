"""Test configuration.

``TRITON_INTERPRET=1`` must be set before any Triton kernel module is imported, so Triton kernels
run on CPU tensors here; GPU-only tests are marked ``cuda`` and skipped without a GPU.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
