"""Capture what the first decoder layer receives: hidden states and keyword arguments.

The model runs normally up to layer 0, which is temporarily wrapped so that it records its
inputs and stops the forward pass. Keyword arguments (attention mask, rotary position embeddings,
ALiBi biases, ...) do not depend on the token values when windows are unpadded and of equal
length, so one set per batch size is kept and reused for every layer.
"""
import inspect

import torch
import torch.nn as nn

from pyprune.models.families import decoder_layers


class _Stop(Exception):
    pass


class _Catcher(nn.Module):
    def __init__(self, layer, sink):
        super().__init__()
        self.layer = layer
        self.sink = sink

    def forward(self, *args, **kwargs):
        hidden, kwargs = _as_keywords(self.layer, args, kwargs)
        self.sink(hidden, kwargs)
        raise _Stop

    def __getattr__(self, name):  # some models read attributes of their layers (e.g. attention_type)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.layer, name)


def _as_keywords(layer, args, kwargs):
    """Split a layer call into its hidden states and keyword arguments (positional ones named
    after the layer's forward signature, as GPT-2 passes the attention mask positionally)."""
    bound = inspect.signature(layer.forward).bind(*args, **kwargs)
    named = {}
    for name, value in bound.arguments.items():
        kind = bound.signature.parameters[name].kind
        if kind == inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        elif kind == inspect.Parameter.VAR_POSITIONAL:
            if value:
                raise NotImplementedError("decoder layers taking *args are not supported")
        else:
            named[name] = value
    first = next(iter(bound.signature.parameters))
    return named.pop(first), named


def layer_kwargs_for_replay(kwargs: dict) -> dict:
    """Drop caching-related arguments: layers are replayed without a KV cache."""
    kwargs = dict(kwargs)
    for key in ("past_key_value", "past_key_values", "layer_past"):
        kwargs.pop(key, None)
    kwargs["use_cache"] = False
    return kwargs


@torch.no_grad()
def capture_layer0_inputs(model, tokens: torch.Tensor, device, batch_size: int = 1, store_device=None):
    """Run ``tokens`` ([nsamples, seqlen]) through the model up to decoder layer 0.

    Everything but the decoder layers is moved to ``device`` for the duration. Returns
    ``(inputs [nsamples, seqlen, hidden] on store_device, kwargs_by_batch_size)``.
    """
    store_device = device if store_device is None else store_device
    layers = decoder_layers(model)
    moved = _move_non_layer_modules(model, layers, device)
    nsamples = tokens.shape[0]
    inputs = None
    kwargs_by_bsz = {}

    def sink(hidden, kwargs):
        nonlocal inputs
        if inputs is None:
            inputs = torch.empty((nsamples,) + tuple(hidden.shape[1:]), dtype=hidden.dtype, device=store_device)
        inputs[sink.start:sink.start + hidden.shape[0]] = hidden.to(store_device)
        bsz = hidden.shape[0]
        if bsz not in kwargs_by_bsz:
            kwargs_by_bsz[bsz] = layer_kwargs_for_replay(kwargs)

    original = layers[0]
    layers[0] = _Catcher(original, sink)
    use_cache = getattr(model.config, "use_cache", None)
    model.config.use_cache = False
    try:
        for start in range(0, nsamples, batch_size):
            sink.start = start
            batch = tokens[start:start + batch_size].to(device)
            try:
                model(input_ids=batch, use_cache=False)
            except _Stop:
                pass
    finally:
        layers[0] = original
        model.config.use_cache = use_cache
        _move_own_tensors(moved, "cpu")
    return inputs, kwargs_by_bsz


def _move_non_layer_modules(model, layers, device):
    """Move every parameter/buffer owner outside the decoder layers to ``device``."""
    if torch.device(device).type == "cpu":
        return []
    layer_ids = {id(m) for layer in layers for m in layer.modules()}
    moved = [m for m in model.modules() if id(m) not in layer_ids and m is not layers]
    _move_own_tensors(moved, device)
    return moved


def _move_own_tensors(modules, device):
    """Move only the tensors a module owns (never its children, which may be decoder layers)."""
    for module in modules:
        for name, param in list(module.named_parameters(recurse=False)):
            param.data = param.data.to(device)
        for name, buf in list(module.named_buffers(recurse=False)):
            module._buffers[name] = buf.to(device)


def run_layer(layer, hidden: torch.Tensor, kwargs: dict):
    """Call a decoder layer and return its hidden-state output."""
    return hidden_output(layer(hidden, **kwargs))


def hidden_output(out):
    """The hidden states among a decoder layer's outputs (layers return tensors or tuples)."""
    return out[0] if isinstance(out, (tuple, list)) else out
