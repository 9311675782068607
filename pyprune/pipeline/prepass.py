"""Dense statistics pre-pass for schedules that allocate before pruning starts (owl, hessian).

The calibration windows run once through the dense decoder layers, one layer at a time on the
compute device, exactly as in the pruning pass but without any solver: each layer's statistics
are collected by hooks during the same forward that produces the next layer's inputs, so each
layer runs once. The schedule receives them through
``schedule.prepass_observe(layer_index, stats_by_name, weights_by_name)`` and makes its plan in
``schedule.finish_prepass(seconds)``.

What is collected depends on ``schedule.prepass_statistics``:
``"hessian"``: each Linear's :class:`LayerStats` (as the pruning pass collects them);
``"input_norms"``: each Linear's per-input RMS ``sqrt(mean x_j^2)`` (a 1-D tensor), i.e. only the
diagonal, which is all OWL's Wanda scores need.
Every schedule also receives ``residual_energy``: the mean squared norm of the layer's output
(the residual stream it writes into) per token, the first token of each window left out.

Memory: one activation buffer, kept where ``options.activations`` says (device, cpu or disk) and
updated in place batch by batch, and one layer's statistics at a time; the buffer is freed before
the pruning pass captures its own.
"""
import time

import torch
from tqdm.auto import tqdm

from pyprune.models.capture import run_layer
from pyprune.models.families import decoder_layers, prunable_linears, weight_matrix
from pyprune.pipeline.activations import ActivationStore
from pyprune.pipeline.statistics import HessianCollector, InputNormCollector

KINDS = ("hessian", "input_norms")


@torch.no_grad()
def run_prepass(schedule, model, tokens: torch.Tensor, options=None) -> float:
    """Run the dense pre-pass for ``schedule``; returns its wall-clock seconds.

    ``options``: the pipeline's ``RunOptions`` (device, activations, activations_dir, batch_size,
    show_progress).
    The model is not modified.
    """
    kind = getattr(schedule, "prepass_statistics", None)
    if kind not in KINDS:
        raise ValueError(f"schedule {getattr(schedule, 'name', schedule)!r} asks for pre-pass statistics "
                         f"{kind!r}; allowed: {', '.join(KINDS)}")
    if tokens is None:
        raise ValueError(f"schedule {schedule.name!r} needs calibration data for its pre-pass")
    device = torch.device(getattr(options, "device", "cpu"))
    batch_size = getattr(options, "batch_size", 1)
    show = getattr(options, "show_progress", False)
    store = ActivationStore(getattr(options, "activations", "device"), device, getattr(options, "activations_dir", None))
    t0 = time.time()
    layers = decoder_layers(model)
    try:
        inputs, kwargs = store.capture(model, tokens, batch_size)
        for index in tqdm(range(len(layers)), desc="schedule pre-pass", disable=not show):
            layer = layers[index].to(device)
            linears = prunable_linears(layer)
            collector = (HessianCollector if kind == "hessian" else InputNormCollector)(
                linears, device, sink_weight=getattr(options, "sink_weight", 1.0),
                sink_cap=getattr(options, "sink_cap", False))
            last = index + 1 == len(layers)
            energy, counted = 0.0, 0
            with collector:
                for start in range(0, inputs.shape[0], batch_size):
                    collector.new_batch()
                    batch = store.batch(inputs, start, batch_size, device)
                    out = run_layer(layer, batch, kwargs[batch.shape[0]])
                    # Skip position 0: the attention sink's residual norm is orders of magnitude above
                    # every other token's and would set the scale alone.
                    energy += out[:, 1:].double().pow(2).sum().item()
                    counted += out[:, 1:, 0].numel()
                    if not last:  # each window depends only on itself, so the buffer is reused in place
                        store.put(inputs, start, out)
            stats = collector.stats if kind == "hessian" else collector.rms
            schedule.prepass_observe(index, stats, {name: weight_matrix(m) for name, m in linears},
                                     residual_energy=energy / max(counted, 1))
            layers[index] = layer.to("cpu")
        del inputs
    finally:
        store.close()
    seconds = time.time() - t0
    schedule.finish_prepass(seconds)
    return seconds
