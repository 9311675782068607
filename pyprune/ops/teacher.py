"""The target of an INT4 step calibrated against a teacher model (asymmetric calibration).

A Linear of the quantized model sees inputs ``X`` that have drifted from the inputs ``X~`` of the
same Linear in the teacher (the model as it is before quantization: pruned, or dense with
``--method none``), because every earlier layer was quantized. Plain GPTQ minimises
``||(W - Q) X||^2`` and so reproduces the teacher's weight on the drifted inputs; the teacher's
output is ``W X~``. Minimising ``||W X~ - Q X||^2`` instead corrects the drift as well.

With ``H = (2/n) X X^T`` and ``C = (2/n) X~ X^T`` that objective equals, up to a constant,
``||(W* - Q) X||^2`` for

    W* = W + W (C - H) (H + lambda I)^-1,

the least-squares weight on the drifted inputs, regularised towards ``W`` by a dampening
``lambda = damp_fraction * mean(diag H)`` of its own. So any quantizer of the
``||(W* - Q) X||^2`` form (GPTQ, mask-preserving GPTQ, the refinement) reaches the teacher
objective just by being given ``W*`` as its target. With ``X~ = X`` the target is ``W`` itself.

``W*`` is dense even where ``W`` is pruned; a mask-preserving quantizer sets those weights to zero
and compensates them into kept weights, like any other pruned weight.

``X`` must be the inputs the Linear will really see: within a decoder layer, collected after the
Linears before it are quantized (the runner collects group by group). Collected from the layer with
its earlier Linears still unquantized, ``X`` lacks the drift those Linears add, and their own
correction and this one undo the same teacher error twice: on SmolLM2-135M that doubled
correction took GPTQ INT4 from 32 to 180 perplexity (8 x 512 calibration tokens, 4 evaluation
windows), and to 482 under protocol P1.
"""
import torch

from pyprune.ops.hessian import fix_dead_columns


def teacher_target(W: torch.Tensor, H: torch.Tensor, cross: torch.Tensor, damp_fraction: float) -> torch.Tensor:
    """``W* = W + W (C - H) (H + lambda I)^-1`` (float32, ``W``'s shape and device).

    ``W`` [out, in]: the teacher's weight; ``H`` [in, in]: ``(2/n) sum x x^T`` of the quantized
    model's inputs; ``cross`` [in, in]: ``(2/n) sum x~ x^T`` (teacher inputs x~, rows; own inputs x,
    columns), accumulated over the same tokens with the same weights as ``H``.
    """
    cols = W.shape[1]
    for name, M in (("H", H), ("cross", cross)):
        if tuple(M.shape) != (cols, cols):
            raise ValueError(f"{name} must be [{cols}, {cols}] for W of shape {tuple(W.shape)}, got {tuple(M.shape)}")
    if not damp_fraction > 0:
        raise ValueError(f"damp_fraction={damp_fraction}: must be > 0 (it keeps the solve regular)")
    H64 = H.double().to(W.device)
    drift = W.double() @ (cross.double().to(W.device) - H64)
    Hd = H64.clone()
    fix_dead_columns(Hd)  # an input the quantized model never sees gets a unit diagonal, as in the sweep
    Hd.diagonal().add_(damp_fraction * float(Hd.diagonal().mean()))
    L = torch.linalg.cholesky(Hd)
    correction = torch.cholesky_solve(drift.t(), L).t()  # drift @ Hd^-1 (Hd symmetric)
    return (W.double() + correction).float()
