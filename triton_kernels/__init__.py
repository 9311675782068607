"""Triton kernels of pyprune (installed as ``pyprune.triton_kernels``): matmul with packed
2:4, INT4 and 2:4+INT4 weights (layouts in ``pyprune.formats``), decode and prefill paths,
fp16/bf16 activations, fp32 accumulation. Needs ``triton`` (>= 3.6); on CPU only under
``TRITON_INTERPRET=1``."""
from ._common import KernelConfig, graph_time_ms, interpreting, tuned_configs
from .int4_matmul import int4_dequantize, int4_matmul
from .sparse24_int4_matmul import sparse24_int4_dequantize, sparse24_int4_matmul
from .sparse24_matmul import sparse24_matmul, sparse24_to_dense

__all__ = [
    "KernelConfig", "graph_time_ms", "interpreting", "tuned_configs",
    "sparse24_matmul", "sparse24_to_dense",
    "int4_matmul", "int4_dequantize",
    "sparse24_int4_matmul", "sparse24_int4_dequantize",
]
