"""What the INT4 quantizers (rtn, gptq, joint sparsegpt) return.

``weight`` is the dequantized float32 matrix and equals ``scale * code`` exactly (see
``pyprune.ops.int4_grid``); ``qweight``/``scales``/``pruned`` are the storable form. The mask is
carried explicitly because a kept weight may round to code 0: zeros alone do not give the mask.
"""
from dataclasses import dataclass, field
from typing import Optional

import torch

from pyprune.ops import int4_grid
from pyprune.solvers.base import reconstruction_loss


@dataclass
class QuantCodes:
    """The storable part of a result: what a checkpoint or an INT4 module needs."""

    qweight: torch.Tensor  # int8 [out, in]
    scales: torch.Tensor  # float32 [out, in // groupsize], fp16-exact
    pruned: torch.Tensor  # bool [out, in]
    groupsize: int

    def dequantize(self) -> torch.Tensor:
        return int4_grid.dequantize_groups(self.qweight, self.scales, self.groupsize)


@dataclass
class QuantResult:
    weight: torch.Tensor  # float32 [out, in], exactly scale * code
    qweight: torch.Tensor  # int8 [out, in], codes in -8..7 (0 wherever pruned)
    scales: torch.Tensor  # float32 [out, in // groupsize], fp16-exact, nonzero
    pruned: torch.Tensor  # bool [out, in], True = removed (bit-identical to a given mask)
    groupsize: int  # resolved columns per scale (in_features for per-channel)
    loss: float  # 0.5 * tr(dW H dW^T) against the W that was passed in; nan without H
    info: dict = field(default_factory=dict)

    bits = int4_grid.BITS

    def dequantize(self) -> torch.Tensor:
        return int4_grid.dequantize_groups(self.qweight, self.scales, self.groupsize)

    def codes(self, device="cpu") -> QuantCodes:
        return QuantCodes(self.qweight.to(device), self.scales.to(device), self.pruned.to(device), self.groupsize)


def check_mask(pruned: Optional[torch.Tensor], W: torch.Tensor) -> Optional[torch.Tensor]:
    """A given mask must be bool and shaped like ``W``."""
    if pruned is None:
        return None
    if pruned.dtype != torch.bool or tuple(pruned.shape) != tuple(W.shape):
        raise ValueError(
            f"pruned must be a bool mask of shape {tuple(W.shape)} (True = pruned), "
            f"got {pruned.dtype} {tuple(pruned.shape)}"
        )
    return pruned.to(W.device)


def make_result(W_in, weight, scales, pruned, groupsize, H, info) -> QuantResult:
    """Encode a float32 on-grid ``weight`` into codes (raising if it is off the grid)."""
    weight = weight.float()
    scales = scales.float()
    int4_grid.check_scales(scales)
    qweight = int4_grid.encode(weight, scales, groupsize)
    if pruned is not None and qweight[pruned].any():
        raise AssertionError("a pruned weight has a nonzero INT4 code")
    loss = reconstruction_loss(W_in, weight, H)
    if H is not None:
        # Relative error: the loss over the loss of removing the whole layer.
        info["rel_error"] = loss / max(reconstruction_loss(W_in, torch.zeros_like(weight), H), 1e-30)
    info.setdefault("groupsize", groupsize)
    return QuantResult(weight, qweight, scales, pruned, groupsize, loss, info)
