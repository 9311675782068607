"""Lazy access to the compiled extension ``pyprune._C``.

The extension is optional: it is missing on CPU-only installs and useless without a GPU. Ops ask
``kernel_for(tensor)`` and get the module only when the tensor lives on a CUDA device, the
extension imported, and ``PYPRUNE_FORCE_REFERENCE`` is not set (that variable exists for A/B runs).
Loading never raises: an extension that was not built, or was built against another torch and
fails to load, reads as absent and ``extension_error()`` says why.
"""
import functools
import os

import torch

FORCE_REFERENCE_ENV = "PYPRUNE_FORCE_REFERENCE"
# Set by CI where the build must produce the extension; tests then fail if it does not import.
EXPECT_EXTENSION_ENV = "PYPRUNE_EXPECT_EXTENSION"


def _import_extension():
    """(module, None) or (None, reason)."""
    try:
        from pyprune import _C  # built only with a CUDA toolchain
    except Exception as exc:  # ImportError, or a broken binary (undefined symbol, missing library)
        return None, f"{type(exc).__name__}: {exc}"
    return _C, None


@functools.lru_cache(maxsize=1)
def load_extension():
    """The ``pyprune._C`` module, or None when it was not built or cannot load."""
    return _import_extension()[0]


def extension_error():
    """Why the extension is not available (a string), or None when it is."""
    return _import_extension()[1]


def reference_forced():
    return os.environ.get(FORCE_REFERENCE_ENV, "") not in ("", "0")


def kernel_for(tensor: torch.Tensor):
    """The extension module if ``tensor`` should be handled by a CUDA kernel, else None."""
    if reference_forced() or not tensor.is_cuda:
        return None
    return load_extension()
