"""The INT4 quantization format of pyprune (the one place it is defined).

* Integers are signed 4-bit, ``-8 ... 7``; zero is exactly representable, so a pruned weight
  stays exactly zero after quantization.
* One scale per output row per group of ``groupsize`` consecutive input columns, in the original
  column order (``groupsize=-1``: one group spanning the whole row). The group size must divide
  the layer width; there are no ragged groups. Scales are rounded to float16
  when fitted, so the packed checkpoint (fp16 scales) represents them exactly. A scale is
  nonzero and may be negative: ``-s * q`` for ``q`` in ``-8 ... 7`` is the grid ``s * (-7 ... 8)``,
  so the sign of the scale chooses which side of zero gets the 8th level.
* A weight is ``scale * q``. Ways to fit a group's scale (``scale_fit``), all over the group's
  kept weights (pruned ones are zero, which every scale represents exactly):

  - ``"minmax"`` (default): ``scale = max|w| / 7``, positive, so the largest magnitude maps to
    +-7 and -8 is only reached by values pushed there by error compensation (15 of the 16 levels);
  - ``"signed"``: the smallest ``|scale|`` whose grid covers the group without clipping, its sign
    chosen so that the side of zero holding the largest magnitude gets 8 steps. All 16 levels are
    used: the step is up to 7/8 of min-max's, never larger;
  - ``"mse"`` / ``"signed-mse"``: the scale among ``s * r`` for ``s`` the min-max / signed scale and
    ``r`` in ``MSE_RATIOS`` (1.00, 0.99, ..., 0.30) that gives the smallest squared rounding error
    of the group, optionally weighted per column. Shrinking clips the few largest weights and buys
    a finer grid for the rest; ``r = 1`` is a candidate, so the error is never above the start's.
* ``scale * q`` is exact in float32 (11 significant bits times 4), so the dequantized float32
  weight and the pair (codes, scales) carry exactly the same information. It is generally NOT
  exact in float16/bfloat16: there, the codes and scales are the truth.

Tensors: codes ``int8 [out, in]``, scales ``float32 [out, in // groupsize]`` (fp16-exact).
"""
import torch

QMIN = -8
QMAX = 7
BITS = 4
SCALE_BITS = 16  # scales are stored as float16
VALID_GROUPSIZES = (-1, 32, 64, 128, 256)
SCALE_FITS = ("minmax", "mse", "signed", "signed-mse")
MSE_RATIOS = tuple(round(1.0 - 0.01 * k, 2) for k in range(71))  # 1.00 down to 0.30


def check_scale_fit(scale_fit: str) -> str:
    if scale_fit not in SCALE_FITS:
        raise ValueError(f"scale_fit={scale_fit!r} is not supported; allowed: {', '.join(SCALE_FITS)}")
    return scale_fit


def check_groupsize(groupsize: int, in_features: int) -> int:
    """Validate a group size against a layer width; returns the effective group size.

    A group size equal to the width is the resolved form of -1 (per channel) and is accepted.
    """
    if groupsize == in_features:
        return in_features
    if groupsize not in VALID_GROUPSIZES:
        raise ValueError(
            f"groupsize={groupsize} is not supported; allowed: {', '.join(map(str, VALID_GROUPSIZES))}"
            " (-1 = one scale per output channel)"
        )
    if groupsize == -1:
        return in_features
    if in_features % groupsize:
        fitting = [str(g) for g in VALID_GROUPSIZES if g == -1 or in_features % g == 0]
        raise ValueError(
            f"groupsize={groupsize} does not divide the layer width {in_features}; "
            f"group sizes valid for this width: {', '.join(fitting)} (-1 = per channel)"
        )
    return groupsize


def fit_scale(w: torch.Tensor, scale_fit: str = "minmax", weight: torch.Tensor = None) -> torch.Tensor:
    """Scale for each row of ``w`` ([rows, g] -> [rows, 1], float32, fp16-exact).

    ``weight`` (broadcastable to ``w``, non-negative) weighs each weight's squared rounding error
    in the ``"mse"`` fit; min-max ignores it.
    """
    check_scale_fit(scale_fit)
    w = w.float()
    start = _signed_scale(w) if scale_fit.startswith("signed") else w.abs().amax(dim=1, keepdim=True) / QMAX
    best = _fp16_scale(start)
    if not scale_fit.endswith("mse"):
        return best
    best_err = _rounding_error(w, best, weight)
    for ratio in MSE_RATIOS[1:]:
        scale = _fp16_scale(start * ratio)
        err = _rounding_error(w, scale, weight)
        better = err < best_err  # strict: ties keep the wider scale
        best = torch.where(better, scale, best)
        best_err = torch.where(better, err, best_err)
    return best


def _signed_scale(w: torch.Tensor) -> torch.Tensor:
    """Per row, the scale of smallest magnitude whose grid ``scale * (-8 ... 7)`` holds the row's
    range: positive covers ``[-8s, 7s]``, negative covers ``[-7s, 8s]`` (``s = |scale|``)."""
    top = w.amax(dim=1, keepdim=True).clamp(min=0)
    bottom = (-w).amax(dim=1, keepdim=True).clamp(min=0)
    positive = torch.maximum(bottom / -QMIN, top / QMAX)
    negative = torch.maximum(top / -QMIN, bottom / QMAX)
    return torch.where(negative < positive, -negative, positive)


def _fp16_scale(scale: torch.Tensor) -> torch.Tensor:
    scale = scale.to(torch.float16).float()
    # All-zero rows (fully pruned groups) and fp16 underflow: any nonzero scale represents 0.
    return torch.where(scale != 0, scale, torch.ones_like(scale))


def _rounding_error(w, scale, weight):
    err = (fake_quantize(w, scale) - w).pow(2)
    if weight is not None:
        err = err * weight
    return err.sum(dim=1, keepdim=True)


def quantize(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Integer codes (as float32 tensor holding integers) for ``w`` on the grid of ``scale``."""
    return torch.clamp(torch.round(w.float() / scale), QMIN, QMAX)


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q * scale


def fake_quantize(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``w`` moved to its nearest grid point (float32)."""
    return dequantize(quantize(w, scale), scale)


# Whole-matrix helpers (groups in the original column order).

def fit_group_scales(W: torch.Tensor, groupsize: int, pruned: torch.Tensor = None,
                     scale_fit: str = "minmax", column_weight: torch.Tensor = None) -> torch.Tensor:
    """Scales ``[rows, cols // groupsize]`` of every group; pruned weights excluded.

    ``column_weight`` ([cols]) weighs the rounding error of each input column in the mse fit.
    """
    rows, cols = W.shape
    g = check_groupsize(groupsize, cols)
    W = W.float()
    if pruned is not None:
        W = W.masked_fill(pruned, 0.0)
    weight = None
    if column_weight is not None:
        weight = column_weight.float().reshape(1, cols // g, g).expand(rows, -1, -1).reshape(-1, g)
    return fit_scale(W.reshape(rows * (cols // g), g), scale_fit, weight).reshape(rows, cols // g)


def expand_scales(scales: torch.Tensor, groupsize: int) -> torch.Tensor:
    """``[rows, ngroups]`` -> ``[rows, ngroups * groupsize]``: the scale of every weight."""
    return scales.float().repeat_interleave(groupsize, dim=1)


def _resolve(scales: torch.Tensor, groupsize: int, cols: int) -> int:
    g = check_groupsize(groupsize, cols)
    if scales.shape[1] != cols // g:
        raise ValueError(
            f"scales have {scales.shape[1]} groups per row, but width {cols} with groupsize "
            f"{groupsize} needs {cols // g}"
        )
    return g


def quantize_groups(W: torch.Tensor, scales: torch.Tensor, groupsize: int) -> torch.Tensor:
    """Round ``W`` to the grid of ``scales``: int8 codes in ``-8..7`` ([rows, cols])."""
    g = _resolve(scales, groupsize, W.shape[1])
    return quantize(W, expand_scales(scales, g)).to(torch.int8)


def dequantize_groups(codes: torch.Tensor, scales: torch.Tensor, groupsize: int) -> torch.Tensor:
    """``scale * q`` as float32 (exact)."""
    g = _resolve(scales, groupsize, codes.shape[1])
    return codes.float() * expand_scales(scales, g)


def encode(W: torch.Tensor, scales: torch.Tensor, groupsize: int) -> torch.Tensor:
    """Codes of a weight that already lies on the grid; raises if any value is off the grid.

    Used to turn a solver's dequantized float32 output into (codes, scales) without loss.
    """
    codes = quantize_groups(W, scales, groupsize)
    back = dequantize_groups(codes, scales, groupsize)
    off = back != W.float()
    if off.any():
        r, c = (int(i) for i in torch.nonzero(off)[0])
        raise ValueError(
            f"weight is not on the INT4 grid: {int(off.sum())} values differ from scale * code, "
            f"e.g. W[{r}, {c}] = {float(W[r, c])!r} vs {float(back[r, c])!r}"
        )
    return codes


def check_scales(scales: torch.Tensor) -> None:
    """Scales must be nonzero, finite and exactly representable in float16."""
    s = scales.float()
    if not torch.isfinite(s).all() or (s == 0).any():
        raise ValueError("INT4 scales must be nonzero and finite")
    if not torch.equal(s.to(torch.float16).float(), s):
        raise ValueError("INT4 scales must be exactly representable in float16")
