"""The dispatch seam: every hot operation has a PyTorch reference (the truth, runs anywhere) and,
where one exists, a CUDA (``pyprune._C``) or Triton implementation used on GPU tensors.
Set ``PYPRUNE_FORCE_REFERENCE=1`` to force the reference everywhere."""
from pyprune.ops.admm_step import AdmmStep, admm_step
from pyprune.ops._extension import FORCE_REFERENCE_ENV, extension_error, kernel_for, load_extension
from pyprune.ops.hessian import (
    CholeskyError, HessianFactor, accumulate_hessian, inverse_hessian_factor, no_tf32,
)
from pyprune.ops.obs_sweep import QuantSpec, SweepResult, obs_sweep

__all__ = [
    "AdmmStep", "admm_step",
    "FORCE_REFERENCE_ENV", "extension_error", "kernel_for", "load_extension",
    "CholeskyError", "HessianFactor", "accumulate_hessian", "inverse_hessian_factor", "no_tf32",
    "QuantSpec", "SweepResult", "obs_sweep",
]
