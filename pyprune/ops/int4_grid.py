"""The INT4 quantization format of pyprune (the one place it is defined).

* Integers are signed 4-bit, ``-8 ... 7``; zero is exactly representable, so a pruned weight
  stays exactly zero after quantization.
* One scale per output row per group of ``groupsize`` consecutive input columns
  (``groupsize=-1``: one group spanning the whole row). Scales are positive and are rounded to
  float16 when fitted, so the packed checkpoint (fp16 scales) represents them exactly.
* A weight is ``scale * q``; min-max fit: ``scale = max|w| / 7`` over the group, so the largest
  magnitude maps to +-7 and -8 is only reached by values pushed there by error compensation.
"""
import torch

QMIN = -8
QMAX = 7
VALID_GROUPSIZES = (-1, 32, 64, 128, 256)


def check_groupsize(groupsize: int, in_features: int) -> int:
    """Validate a group size against a layer width; returns the effective group size."""
    if groupsize not in VALID_GROUPSIZES:
        raise ValueError(
            f"groupsize={groupsize} is not supported; allowed: {', '.join(map(str, VALID_GROUPSIZES))}"
            " (-1 = one scale per output channel)"
        )
    if groupsize == -1:
        return in_features
    if in_features % groupsize:
        raise ValueError(
            f"groupsize={groupsize} does not divide the layer width {in_features}; "
            "use a group size that divides it or -1 (per channel)"
        )
    return groupsize


def fit_scale(w: torch.Tensor) -> torch.Tensor:
    """Min-max scale for each row of ``w`` ([rows, g] -> [rows, 1], float32, fp16-exact)."""
    absmax = w.abs().amax(dim=1, keepdim=True).float()
    scale = (absmax / QMAX).to(torch.float16).float()
    # All-zero rows (fully pruned groups) and fp16 underflow: any positive scale represents 0.
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def quantize(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Integer codes (as float32 tensor holding integers) for ``w`` on the grid of ``scale``."""
    return torch.clamp(torch.round(w.float() / scale), QMIN, QMAX)


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q * scale


def fake_quantize(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``w`` moved to its nearest grid point (float32)."""
    return dequantize(quantize(w, scale), scale)
