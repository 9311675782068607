"""Drop-in replacements for ``nn.Linear`` that hold a packed weight.

``Sparse24Linear`` (2:4), ``Int4Linear`` (INT4) and ``Sparse24Int4Linear`` (2:4 + INT4) store the
tensors of a ``pyprune.formats`` layout as buffers (so ``state_dict``, ``.to()`` and
``load_state_dict`` work as usual) and compute ``y = x W^T + b``:

* on a CUDA device with fp16/bf16 activations: the Triton kernel of the format (no dense weight
  is ever materialised);
* otherwise (CPU, fp32 activations, triton missing, or ``PYPRUNE_FORCE_REFERENCE=1``): the exact
  reference, unpack to a float32 dense weight then ``x.float() @ W^T``, cast back to x's dtype.
"""
import torch
import torch.nn as nn

from pyprune.formats import (
    Int4Weight, PatternError, Sparse24Int4Weight, Sparse24Weight, pack_int4, pack_sparse24,
    pack_sparse24_int4,
)
from pyprune.formats.int4 import codes_on_grid, resolve_groupsize, rtn_codes
from pyprune.formats.sparse24 import check_2of4
from pyprune.ops._extension import reference_forced

_KERNEL_DTYPES = (torch.float16, torch.bfloat16)


def _triton_kernels():
    """The kernel package, or None where triton cannot be imported."""
    try:
        from pyprune import triton_kernels
    except ImportError:
        return None
    return triton_kernels


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _weight_of(linear) -> torch.Tensor:
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
    return linear.weight.detach()


def _bias_of(linear):
    return None if linear.bias is None else linear.bias.detach().clone()


class CompressedLinear(nn.Module):
    """Common part of the three modules: bias, forward dispatch, repr, size accounting."""

    format = ""
    packed_names = ()

    def __init__(self, packed, bias=None):
        super().__init__()
        self.out_features, self.in_features = packed.shape
        for name, tensor in packed.tensors().items():
            self.register_buffer(name, tensor)
        self.register_buffer("bias", bias)

    # -- the packed weight -------------------------------------------------------------------
    def packed(self):
        """The ``pyprune.formats`` object over this module's buffers (no copy)."""
        raise NotImplementedError

    def layout(self) -> dict:
        """What a checkpoint manifest records to rebuild the module."""
        out = self.packed().layout()
        out["bias_dtype"] = None if self.bias is None else _dtype_name(self.bias.dtype)
        return out

    @classmethod
    def from_layout(cls, layout: dict, device="meta"):
        """An empty module (buffers on ``device``, uninitialised) to load a state dict into."""
        raise NotImplementedError

    @staticmethod
    def _empty_bias(layout, n, device):
        dt = layout.get("bias_dtype")
        return None if dt is None else torch.empty(n, dtype=getattr(torch, dt), device=device)

    def dense_weight(self, dtype=torch.float32) -> torch.Tensor:
        """The dense ``[out, in]`` weight (exact in float32)."""
        return self.packed().dense(dtype)

    @property
    def bits_per_weight(self) -> float:
        return self.packed().bits_per_weight

    @property
    def ratio_vs_fp16(self) -> float:
        return self.packed().ratio_vs_fp16

    # -- forward -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._use_kernel(x):
            kernels = _triton_kernels()
            if kernels is not None:
                return self._kernel(kernels, x)
        return self.reference_forward(x)

    def _use_kernel(self, x: torch.Tensor) -> bool:
        return x.is_cuda and x.dtype in _KERNEL_DTYPES and not reference_forced()

    def kernel_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The Triton path explicitly (CUDA, or CPU under ``TRITON_INTERPRET=1``)."""
        kernels = _triton_kernels()
        if kernels is None:
            raise RuntimeError("triton is not installed: only the reference path is available")
        return self._kernel(kernels, x)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Exact reference: unpack, multiply in float32, cast back."""
        w = self._reference_weight(x.device)
        y = torch.matmul(x.float(), w.t())
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype)

    def _reference_weight(self, device) -> torch.Tensor:
        """The float32 dense weight; kept between calls when caching is on (see
        ``cache_reference_weights``), keyed on the packed tensors so a reload invalidates it."""
        cache = getattr(self, "_dense_cache", None)
        if cache is None:
            return self.dense_weight(torch.float32).to(device)
        key = tuple((t.data_ptr(), t._version, t.device) for t in self.packed().tensors().values()) + (device,)
        if cache.get("key") != key:
            cache["key"], cache["weight"] = key, self.dense_weight(torch.float32).to(device)
        return cache["weight"]

    def _kernel(self, kernels, x):
        raise NotImplementedError

    def _kernel_bias(self, x):
        return None if self.bias is None else self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"format={self.describe_format()}, {self.bits_per_weight:.3f} bits/weight, "
            f"{self.ratio_vs_fp16:.2f}x smaller than fp16"
        )

    def describe_format(self) -> str:
        return self.format


class Sparse24Linear(CompressedLinear):
    """2:4 sparse Linear: fp16/bf16 kept values ``[out, in/2]`` + 2-bit positions (9 bits/weight)."""

    format = "2:4"

    def packed(self) -> Sparse24Weight:
        return Sparse24Weight(values=self.values, meta=self.meta, shape=(self.out_features, self.in_features))

    @classmethod
    def from_linear(cls, linear: nn.Linear, dtype: torch.dtype = None) -> "Sparse24Linear":
        """Pack a Linear whose weight is 2:4 sparse (PatternError names the first bad group).
        ``dtype``: value dtype (default: the weight's if fp16/bf16, else fp16)."""
        return cls(pack_sparse24(_weight_of(linear), dtype), _bias_of(linear))

    @classmethod
    def from_layout(cls, layout, device="meta"):
        n, k = layout["shape"]
        dt = getattr(torch, layout.get("value_dtype", "float16"))
        packed = Sparse24Weight(
            values=torch.empty(n, k // 2, dtype=dt, device=device),
            meta=torch.empty(k // 32, n, dtype=torch.int32, device=device), shape=(n, k),
        )
        return cls(packed, cls._empty_bias(layout, n, device))

    def describe_format(self):
        return f"2:4 ({_dtype_name(self.values.dtype)} values)"

    def _kernel(self, kernels, x):
        return kernels.sparse24_matmul(x, self.values, self.meta, self._kernel_bias(x))


def _quantized_codes(weight, groupsize, codes, scales, quant_state, check):
    """(codes, scales [out, ngroups], groupsize) for the INT4 modules, from (in order of
    preference) a quant state, given codes + scales, given scales (weight on their grid), or RTN."""
    if quant_state is not None:
        codes, scales, groupsize = quant_state.qweight, quant_state.scales, quant_state.groupsize
    if codes is not None:
        if scales is None:
            raise ValueError("integer codes need their scales")
        codes = codes.to(weight.device)
        scales = scales.float().to(weight.device)
        g = resolve_groupsize(groupsize, weight.shape[1])
        if tuple(codes.shape) != tuple(weight.shape):
            raise ValueError(f"codes have shape {tuple(codes.shape)}, the layer weight {tuple(weight.shape)}")
        if check:
            dense = codes.float() * scales.repeat_interleave(g, dim=1)
            if not torch.equal(dense.to(weight.dtype), weight):
                diff = float((dense - weight.float()).abs().max())
                raise PatternError(
                    f"the INT4 codes and scales do not reproduce the layer's weight (max |difference| "
                    f"{diff:.3g}); they belong to another model or layer (check=False skips this test)"
                )
        return codes, scales, g
    if scales is not None:
        g = resolve_groupsize(groupsize, weight.shape[1])
        return codes_on_grid(weight, scales, g), scales.float(), g
    codes, scales = rtn_codes(weight, groupsize)
    return codes, scales, resolve_groupsize(groupsize, weight.shape[1])


class Int4Linear(CompressedLinear):
    """INT4 Linear: codes 8 per int32 along K + fp16 scale per row per group (4 + 16/G bits/weight)."""

    format = "int4"

    def __init__(self, packed: Int4Weight, bias=None):
        super().__init__(packed, bias)
        self.groupsize = packed.groupsize

    def packed(self) -> Int4Weight:
        return Int4Weight(qweight=self.qweight, scales=self.scales,
                          shape=(self.out_features, self.in_features), groupsize=self.groupsize)

    @classmethod
    def from_linear(cls, linear: nn.Linear, groupsize: int = 128, codes=None, scales=None,
                    quant_state=None, check: bool = True) -> "Int4Linear":
        """Build from an nn.Linear.

        * ``quant_state`` (an object with ``qweight``/``scales``/``groupsize``, e.g. from
          ``pyprune.formats.quant_state``) or ``codes`` + ``scales`` (``[out, in]`` integers,
          ``[out, in/G]`` fp16-exact): taken exactly; with ``check`` they must reproduce the
          layer's weight (rounded to its dtype).
        * ``scales`` only: the weight must already lie on their grid; its codes are recovered.
        * neither: round-to-nearest on the int4_grid with group size ``groupsize``.
        """
        weight = _weight_of(linear)
        codes, scales, g = _quantized_codes(weight, groupsize, codes, scales, quant_state, check)
        return cls(pack_int4(codes, scales, g), _bias_of(linear))

    @classmethod
    def from_layout(cls, layout, device="meta"):
        n, k = layout["shape"]
        g = int(layout["groupsize"])
        packed = Int4Weight(
            qweight=torch.empty(n, k // 8, dtype=torch.int32, device=device),
            scales=torch.empty(k // g, n, dtype=torch.float16, device=device), shape=(n, k), groupsize=g,
        )
        return cls(packed, cls._empty_bias(layout, n, device))

    def describe_format(self):
        return f"int4 g{self.groupsize}"

    def _kernel(self, kernels, x):
        return kernels.int4_matmul(x, self.qweight, self.scales, self.groupsize, self._kernel_bias(x))


class Sparse24Int4Linear(CompressedLinear):
    """2:4 sparse + INT4 Linear: kept codes (2 bits/weight) + positions (1) + scales (16/G)."""

    format = "2:4-int4"

    def __init__(self, packed: Sparse24Int4Weight, bias=None):
        super().__init__(packed, bias)
        self.groupsize = packed.groupsize

    def packed(self) -> Sparse24Int4Weight:
        return Sparse24Int4Weight(qvalues=self.qvalues, meta=self.meta, scales=self.scales,
                                  shape=(self.out_features, self.in_features), groupsize=self.groupsize)

    @classmethod
    def from_linear(cls, linear: nn.Linear, groupsize: int = 128, codes=None, scales=None,
                    quant_state=None, check: bool = True) -> "Sparse24Int4Linear":
        """As ``Int4Linear.from_linear``; the weight (and the codes) must also be 2:4 sparse."""
        weight = _weight_of(linear)
        check_2of4(weight != 0)
        codes, scales, g = _quantized_codes(weight, groupsize, codes, scales, quant_state, check)
        return cls(pack_sparse24_int4(codes, scales, g), _bias_of(linear))

    @classmethod
    def from_layout(cls, layout, device="meta"):
        n, k = layout["shape"]
        g = int(layout["groupsize"])
        packed = Sparse24Int4Weight(
            qvalues=torch.empty(n, k // 16, dtype=torch.int32, device=device),
            meta=torch.empty(k // 32, n, dtype=torch.int32, device=device),
            scales=torch.empty(k // g, n, dtype=torch.float16, device=device), shape=(n, k), groupsize=g,
        )
        return cls(packed, cls._empty_bias(layout, n, device))

    def describe_format(self):
        return f"2:4-int4 g{self.groupsize}"

    def _kernel(self, kernels, x):
        return kernels.sparse24_int4_matmul(x, self.qvalues, self.meta, self.scales, self.groupsize,
                                            self._kernel_bias(x))


def cache_reference_weights(model: nn.Module, enabled: bool = True) -> int:
    """Keep the unpacked float32 weight of every packed module between reference-path calls.

    Unpacking costs far more than a small matmul on CPU; evaluating a compressed model on CPU
    (e.g. perplexity) runs much faster with the cache, at the memory cost of the dense fp32
    model. The Triton path never uses it. Returns the number of modules changed."""
    count = 0
    for module in model.modules():
        if isinstance(module, CompressedLinear):
            module._dense_cache = {} if enabled else None
            count += 1
    return count


# Format name (as in pyprune.formats.FORMATS) -> module class.
MODULES = {"2:4": Sparse24Linear, "int4": Int4Linear, "2:4-int4": Sparse24Int4Linear}
