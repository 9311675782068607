"""What every packed weight layout shares: the pattern error, width checks and size accounting."""
import torch

# Every packed layout stores 4-bit fields eight to an int32 word along K and 2:4 metadata for
# 32 columns per word, so the input width must be a multiple of 32 (true of every real LLM).
K_MULTIPLE = 32
VALUE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class PatternError(ValueError):
    """A weight does not follow the pattern a format requires (e.g. more than 2 nonzeros in a
    group of 4 for 2:4). The message names the first offending group."""


def check_matrix(weight: torch.Tensor, what: str = "weight") -> tuple:
    if weight.dim() != 2:
        raise ValueError(f"{what} must be a 2-D [out_features, in_features] matrix, got shape {tuple(weight.shape)}")
    n, k = weight.shape
    if k % K_MULTIPLE:
        raise ValueError(
            f"{what} has in_features={k}; packed formats need a multiple of {K_MULTIPLE} "
            "(8 four-bit fields per int32 word, 8 groups of 4 per metadata word)"
        )
    if n == 0:
        raise ValueError(f"{what} has no output rows")
    return n, k


def tensor_nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class PackedWeight:
    """Base of the packed layouts. Subclasses are dataclasses holding the packed tensors and
    ``shape = (out_features, in_features)`` of the dense weight they represent."""

    kind = ""
    tensor_names = ()

    def tensors(self) -> dict:
        """The packed tensors by name (what a checkpoint stores)."""
        return {name: getattr(self, name) for name in self.tensor_names}

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(*self.tensors().values())

    @property
    def bits_per_weight(self) -> float:
        n, k = self.shape
        return 8.0 * self.nbytes / (n * k)

    @property
    def ratio_vs_fp16(self) -> float:
        """How many times smaller than the same weight stored dense in fp16."""
        n, k = self.shape
        return 2.0 * n * k / self.nbytes

    def to(self, device):
        kwargs = {name: t.to(device) for name, t in self.tensors().items()}
        return type(self)(**kwargs, **self._static_fields())

    def _static_fields(self) -> dict:
        return {"shape": self.shape}


def expect_tensor(t: torch.Tensor, shape, dtypes, name: str):
    """Check a packed tensor's shape and dtype (used when rebuilding from a checkpoint)."""
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"packed tensor {name!r} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    if t.dtype not in dtypes:
        raise ValueError(f"packed tensor {name!r} has dtype {t.dtype}, expected one of {dtypes}")
