"""Architecture adapters and model loading."""
from pyprune.models.families import (
    LAYER_PATHS, UnsupportedModelError, decoder_layers, describe_linears, find_layer_list_path,
    prunable_linears, set_weight_matrix, weight_matrix,
)
from pyprune.models.loading import BUILTIN_MODELS, load_config, load_model, resolve

__all__ = [
    "LAYER_PATHS", "UnsupportedModelError", "decoder_layers", "describe_linears",
    "find_layer_list_path", "prunable_linears", "set_weight_matrix", "weight_matrix",
    "BUILTIN_MODELS", "load_config", "load_model", "resolve",
]
