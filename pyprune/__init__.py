"""pyprune: post-training pruning (unstructured, N:M) and INT4 quantization of causal LMs."""
from pyprune._version import __version__

__all__ = ["__version__"]
