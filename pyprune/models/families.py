"""Where the decoder layers and their Linear sublayers live, per architecture family.

Most Hugging Face decoder-only models keep their decoder layers in one ``nn.ModuleList``; the
table below names it for the families pyprune is tested on. An unlisted family still works when
a ModuleList with ``num_hidden_layers`` entries can be found; otherwise it is refused with an
error naming the family and the supported ones.
"""
from dataclasses import dataclass
from typing import List, Tuple

import torch.nn as nn

try:  # GPT-2 style models use Conv1D (weight stored [in, out]) instead of nn.Linear.
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - very old transformers
    Conv1D = ()

# model_type -> dotted path of the decoder-layer list inside the *ForCausalLM model.
LAYER_PATHS = {
    "llama": "model.layers",
    "mistral": "model.layers",
    "mixtral": "model.layers",
    "qwen2": "model.layers",
    "qwen3": "model.layers",
    "gemma": "model.layers",
    "gemma2": "model.layers",
    "phi3": "model.layers",
    "opt": "model.decoder.layers",
    "gpt_neox": "gpt_neox.layers",
    "bloom": "transformer.h",
    "gpt2": "transformer.h",
    "gptj": "transformer.h",
    "falcon": "transformer.h",
}


class UnsupportedModelError(ValueError):
    pass


def _get(obj, dotted):
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def find_layer_list_path(model) -> str:
    """Dotted path of the decoder-layer ModuleList of ``model``."""
    model_type = getattr(model.config, "model_type", None)
    path = LAYER_PATHS.get(model_type)
    if path is not None and isinstance(_get(model, path), nn.ModuleList):
        return path
    count = getattr(model.config, "num_hidden_layers", None) or getattr(model.config, "n_layer", None)
    candidates = [
        name for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and count and len(module) == count
    ]
    if len(candidates) == 1:
        return candidates[0]
    raise UnsupportedModelError(
        f"unknown model family {model_type!r}: cannot locate its decoder layers. "
        f"Supported families: {', '.join(sorted(LAYER_PATHS))} (and models with a single list of "
        "num_hidden_layers decoder layers)"
    )


def decoder_layers(model) -> nn.ModuleList:
    return _get(model, find_layer_list_path(model))


def is_prunable(module) -> bool:
    return isinstance(module, nn.Linear) or (Conv1D and isinstance(module, Conv1D))


def weight_matrix(module):
    """The weight as ``[out_features, in_features]`` (a transposed view for Conv1D)."""
    return module.weight.data.t() if (Conv1D and isinstance(module, Conv1D)) else module.weight.data


def stored_weight(module, W):
    """``W`` (``[out_features, in_features]``) laid out as ``module.weight`` stores it."""
    return W.t() if (Conv1D and isinstance(module, Conv1D)) else W


def set_weight_matrix(module, W):
    module.weight.data.copy_(stored_weight(module, W))


def prunable_linears(layer: nn.Module) -> List[Tuple[str, nn.Module]]:
    """``(name, module)`` of every Linear (or Conv1D) inside one decoder layer, in order."""
    return [(name, m) for name, m in layer.named_modules() if name and is_prunable(m)]


@dataclass
class LinearInfo:
    name: str
    out_features: int
    in_features: int


def describe_linears(model) -> List[LinearInfo]:
    """All prunable Linears of all decoder layers, with full names (for up-front validation)."""
    path = find_layer_list_path(model)
    out = []
    for i, layer in enumerate(_get(model, path)):
        for name, module in prunable_linears(layer):
            W = weight_matrix(module)
            out.append(LinearInfo(f"{path}.{i}.{name}", W.shape[0], W.shape[1]))
    return out
