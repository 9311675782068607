"""Lazy access to the compiled extension ``pyprune._C``.

The extension is optional: it is missing on CPU-only installs and useless without a GPU. Ops ask
``kernel_for(tensor)`` and get the module only when the tensor lives on a CUDA device, the
extension imported, and ``PYPRUNE_FORCE_REFERENCE`` is not set (that variable exists for A/B runs).
"""
import functools
import os

import torch

FORCE_REFERENCE_ENV = "PYPRUNE_FORCE_REFERENCE"


@functools.lru_cache(maxsize=1)
def load_extension():
    """The ``pyprune._C`` module, or None when it was not built or cannot load."""
    try:
        from pyprune import _C  # noqa: F401  (built only with a CUDA toolchain)
    except ImportError:
        return None
    return _C


def extension_error():
    """Why the extension is not available (a string), or None when it is."""
    try:
        from pyprune import _C  # noqa: F401
    except ImportError as exc:
        return str(exc)
    return None


def reference_forced():
    return os.environ.get(FORCE_REFERENCE_ENV, "") not in ("", "0")


def kernel_for(tensor: torch.Tensor):
    """The extension module if ``tensor`` should be handled by a CUDA kernel, else None."""
    if reference_forced() or not tensor.is_cuda:
        return None
    return load_extension()
