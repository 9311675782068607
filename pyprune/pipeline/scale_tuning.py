"""Block-wise tuning of the INT4 group scales of one decoder layer.

Every quantizer in pyprune (GPTQ, the joint SparseGPT sweep, the refinement) fits one Linear at a
time to that Linear's own output. Inside a decoder layer the Linears' errors then meet: in
attention's softmax, in the gated MLP and in the residual stream. Once every Linear of a layer is
quantized, this step tunes the layer's group scales together, so that the layer's output on the
calibration windows comes closer to the output of the same layer before compression, on the same
inputs::

    min over theta   sum over windows || layer(X; scale * exp(theta)) - layer_before(X) ||^2

with one theta per group scale (Adam, a few epochs over the calibration windows, batches in a
seeded random order). Only the scales move: every code, and with the codes the sparsity mask,
stays as the quantizer left it. The tuned scales are rounded to fp16, so every weight is still
exactly scale x code. The loss over all windows is measured before and after; when tuning did not
lower it, the quantizer's scales are kept.
"""
from dataclasses import dataclass
from typing import Dict

import torch
from torch.func import functional_call

from pyprune.models.capture import hidden_output
from pyprune.models.families import stored_weight
from pyprune.ops import int4_grid
from pyprune.solvers.quant_result import QuantCodes


# Epochs the CLI tunes for by default with GPTQ: under P1 one epoch took SparseGPT 50 % + INT4 g64
# from 42.73 to 40.32 (README, block-wise scale tuning).
DEFAULT_EPOCHS = 1


@dataclass(frozen=True)
class ScaleTuning:
    """Settings of the block-wise scale tuning."""

    epochs: int = DEFAULT_EPOCHS
    lr: float = 5e-3  # Adam step on theta, the log of each scale's multiplier
    seed: int = 0  # order of the batches

    def __post_init__(self):
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 1:
            raise ValueError(f"scale tuning epochs={self.epochs!r}: must be an integer >= 1")
        if not self.lr > 0:
            raise ValueError(f"scale tuning lr={self.lr!r}: must be > 0")


@dataclass
class TunedScales:
    scales: Dict[str, torch.Tensor]  # layer-relative Linear name -> float32 fp16-exact scales
    outputs: torch.Tensor  # the layer's outputs on the inputs, with these scales
    loss_before: float  # sum of squared output errors over all windows, the quantizer's scales
    loss_after: float  # the same with ``scales``
    reference: float  # sum of squared (target - input): what the layer adds to the residual stream
    kept: bool  # True: tuning did not lower the loss; ``scales`` are the quantizer's


def _weights(modules, codes, thetas, dtype):
    """The layer's Linear weights, as functional_call parameters, for multipliers ``thetas``."""
    params = {}
    for name, q in codes.items():
        scales = q.scales if thetas is None else q.scales * torch.exp(thetas[name])
        W = int4_grid.dequantize_groups(q.qweight, scales, q.groupsize).to(dtype)
        params[f"{name}.weight"] = stored_weight(modules[name], W)
    return params


def _squared_error(output, target) -> torch.Tensor:
    return (output.float() - target.float()).pow(2).sum()


def tune_layer_scales(layer, codes: Dict[str, QuantCodes], inputs, targets, kwargs, tuning: ScaleTuning,
                      batch_size: int, device, store) -> TunedScales:
    """Tune the group scales of ``layer``'s quantized Linears (module docstring).

    ``codes``: each quantized Linear's codes, keyed by its name inside ``layer``; ``inputs`` and
    ``targets``: activation buffers of ``store`` (``pipeline.activations``), the layer's inputs
    and its outputs before compression; ``kwargs``: the layer's keyword arguments per batch size.
    ``targets`` is overwritten with the layer's outputs under the returned scales and returned
    as ``outputs`` (the next layer's inputs). The layer's weights are left unchanged."""
    modules = dict(layer.named_modules())
    dtype = next(iter(layer.parameters())).dtype
    codes = {name: QuantCodes(q.qweight.to(device).float(), q.scales.to(device).float(), q.pruned, q.groupsize)
             for name, q in codes.items()}
    starts = list(range(0, inputs.shape[0], batch_size))

    def forward(batch, params):
        return hidden_output(functional_call(layer, params, (batch,), kwargs[batch.shape[0]]))

    loss_before, reference = 0.0, 0.0
    with torch.no_grad():
        params = _weights(modules, codes, None, dtype)
        for start in starts:
            batch = store.batch(inputs, start, batch_size, device)
            target = store.batch(targets, start, batch_size, device)
            loss_before += float(_squared_error(forward(batch, params), target))
            reference += float(_squared_error(target, batch))

    thetas = {name: torch.zeros_like(q.scales, requires_grad=True) for name, q in codes.items()}
    optimizer = torch.optim.Adam(thetas.values(), lr=tuning.lr)
    order = torch.Generator().manual_seed(tuning.seed)
    trainable = [p for p in layer.parameters() if p.requires_grad]
    for p in trainable:  # gradients are wanted for theta only
        p.requires_grad_(False)
    try:
        for _ in range(tuning.epochs):
            for index in torch.randperm(len(starts), generator=order).tolist():
                batch = store.batch(inputs, starts[index], batch_size, device)
                target = store.batch(targets, starts[index], batch_size, device)
                with torch.enable_grad():
                    output = forward(batch, _weights(modules, codes, thetas, dtype))
                    loss = _squared_error(output, target) / target.numel()
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                optimizer.step()
    finally:
        for p in trainable:
            p.requires_grad_(True)

    with torch.no_grad():
        tuned = {name: (q.scales * torch.exp(thetas[name])).to(torch.float16).float() for name, q in codes.items()}
    loss_after = float("nan")
    if all((torch.isfinite(s) & (s != 0)).all() for s in tuned.values()):  # a diverged run is not evaluated
        tuned_codes = {name: QuantCodes(q.qweight, tuned[name], q.pruned, q.groupsize) for name, q in codes.items()}
        loss_after = _replace_with_outputs(forward, _weights(modules, tuned_codes, None, dtype), inputs, targets,
                                           starts, batch_size, device, store)
    kept = not loss_after < loss_before
    if kept:
        tuned = {name: q.scales for name, q in codes.items()}
        _replace_with_outputs(forward, _weights(modules, codes, None, dtype), inputs, targets, starts, batch_size,
                              device, store)
    return TunedScales({name: scales.cpu() for name, scales in tuned.items()}, targets, loss_before,
                       loss_before if kept else loss_after, reference, kept)


@torch.no_grad()
def _replace_with_outputs(forward, params, inputs, buffer, starts, batch_size, device, store) -> float:
    """Overwrite each batch of ``buffer`` with the layer's output on ``inputs``; returns the summed
    squared difference between what ``buffer`` held and those outputs."""
    loss = 0.0
    for start in starts:
        output = forward(store.batch(inputs, start, batch_size, device), params)
        loss += float(_squared_error(output, store.batch(buffer, start, batch_size, device)))
        store.put(buffer, start, output)
    return loss


def describe(result: TunedScales) -> dict:
    """Report fields of one layer's tuning (relative to what the layer adds to its input)."""
    reference = max(result.reference, 1e-30)
    return {"block_error_before_tuning": result.loss_before / reference,
            "block_error_after_tuning": result.loss_after / reference,
            "scale_tuning_kept_quantizer_scales": result.kept}
