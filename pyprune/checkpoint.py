"""Compressed checkpoints: a model with packed Linears saved small and loaded back ready to run.

A checkpoint folder holds:

* ``pyprune_compressed.safetensors``: every tensor of ``model.state_dict()`` (the packed buffers of
  the ``pyprune.nn`` modules, the dense embeddings/norms/lm_head); a tensor shared by several
  names (tied embeddings) is stored once.
* ``pyprune_manifest.json``: ``format``/``format_version``, the library versions, the model
  class and its full config, per compressed module its layout (format, shape, group size, dtypes),
  per tensor its dtype, shape and sha256, the aliases of shared tensors, the exact byte size of the
  weights file, and the size summary (on-disk bytes vs the same model in fp16).
* the tokenizer files, when a tokenizer was given (or found next to the source model).

``load(dir)`` checks the manifest, the file size (truncation) and every tensor's sha256 (tampering)
before building anything, raising :class:`CheckpointError` with the file and what is wrong. It
builds the model from its config with parameters on the meta device (no dense allocation or
random init), puts the packed modules in place and assigns the stored tensors.
"""
import contextlib
import hashlib
import json
import os
import shutil

import torch
import torch.nn as nn

from pyprune._version import __version__
from pyprune.nn import MODULES, CompressedLinear

FORMAT_NAME = "pyprune-compressed"
FORMAT_VERSION = 1
MANIFEST = "pyprune_manifest.json"
WEIGHTS = "pyprune_compressed.safetensors"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json",
)


class CheckpointError(ValueError):
    """A compressed checkpoint is missing, truncated, tampered with or of an unknown version."""


def is_compressed_checkpoint(path) -> bool:
    """True when ``path`` is a folder written by :func:`save_compressed`."""
    return os.path.isfile(os.path.join(str(path), MANIFEST))


def _sha256(t: torch.Tensor) -> str:
    data = t.detach().contiguous().cpu()
    data = data.view(torch.uint8) if data.dtype != torch.bool else data.to(torch.uint8)
    return hashlib.sha256(data.numpy().tobytes()).hexdigest()


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _storage_key(t: torch.Tensor):
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def _dense_dtype(model) -> torch.dtype:
    for module in model.modules():
        if isinstance(module, CompressedLinear):
            continue
        for p in module.parameters(recurse=False):
            if p.is_floating_point():
                return p.dtype
    return torch.float32


def _fp16_bytes(model, tensors: dict, packed_keys: set) -> int:
    """Bytes of the saved model were it stored dense in fp16: packed modules count their dense
    ``[out, in]`` weight, other floating tensors 2 bytes per element (each stored tensor once)."""
    total = sum(
        2 * t.numel() if t.is_floating_point() else t.numel() * t.element_size()
        for key, t in tensors.items() if key not in packed_keys
    )
    for module in model.modules():
        if isinstance(module, CompressedLinear):
            total += 2 * module.in_features * module.out_features
    return total


def _config_dict(model) -> dict:
    return json.loads(model.config.to_json_string(use_diff=False))


def save_compressed(model: nn.Module, out_dir, tokenizer=None, report=None, dense_dtype=None) -> dict:
    """Write ``model`` (after :func:`pyprune.compress`) to ``out_dir``; returns the size summary
    (also stored in the manifest): ``on_disk_bytes``, ``fp16_bytes``, ``ratio_vs_fp16``.

    ``tokenizer``: saved alongside (else tokenizer files next to ``model.name_or_path`` are
    copied when that is a local folder). ``report``: a CompressReport (or dict) kept in the
    manifest. ``dense_dtype``: store the dense floating tensors (embeddings, norms, lm_head,
    biases) in this dtype, e.g. float16 for a model evaluated in float32; packed tensors keep
    their format."""
    from safetensors.torch import save_file

    out_dir = str(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    tensors, aliases, by_storage = {}, {}, {}
    packed_keys = {
        f"{name}.{t}" for name, m in model.named_modules() if isinstance(m, CompressedLinear) for t in m.packed().tensor_names
    }
    for key, t in model.state_dict().items():
        if t.device.type == "meta":
            raise CheckpointError(f"cannot save {key!r}: it is on the meta device (never loaded)")
        skey = _storage_key(t)
        if skey in by_storage:
            aliases[key] = by_storage[skey]
            continue
        by_storage[skey] = key
        t = t.detach().to("cpu")
        if dense_dtype is not None and key not in packed_keys and t.is_floating_point():
            t = t.to(dense_dtype)
        tensors[key] = t.contiguous()
    modules = {name: m.layout() for name, m in model.named_modules() if isinstance(m, CompressedLinear)}
    if not modules:
        raise CheckpointError("the model has no packed modules: run pyprune.compress(model, format) first")

    path = os.path.join(out_dir, WEIGHTS)
    tmp = path + ".tmp"
    save_file(tensors, tmp, metadata={"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION)})
    os.replace(tmp, path)
    weights_bytes = os.path.getsize(path)

    tokenizer_files = _save_tokenizer(model, tokenizer, out_dir)
    fp16 = _fp16_bytes(model, tensors, packed_keys)
    size = {"on_disk_bytes": weights_bytes, "fp16_bytes": fp16, "ratio_vs_fp16": weights_bytes / fp16}
    import transformers

    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "pyprune_version": __version__,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "model_class": type(model).__name__,
        "dense_dtype": _dtype_name(dense_dtype or _dense_dtype(model)),
        "model_config": _config_dict(model),
        "modules": modules,
        "tensors": {
            k: {"dtype": _dtype_name(t.dtype), "shape": list(t.shape), "sha256": _sha256(t)}
            for k, t in tensors.items()
        },
        "aliases": aliases,
        "weights_file": {"name": WEIGHTS, "bytes": weights_bytes},
        "tokenizer_files": tokenizer_files,
        "size": size,
        "compression": report.to_dict() if hasattr(report, "to_dict") else report,
    }
    tmp = os.path.join(out_dir, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
    os.replace(tmp, os.path.join(out_dir, MANIFEST))
    return size


def _save_tokenizer(model, tokenizer, out_dir) -> list:
    before = set(os.listdir(out_dir))
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    else:
        src = getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "")
        if src and os.path.isdir(src):
            for name in TOKENIZER_FILES:
                if os.path.isfile(os.path.join(src, name)):
                    shutil.copyfile(os.path.join(src, name), os.path.join(out_dir, name))
    written = sorted(set(os.listdir(out_dir)) - before - {WEIGHTS, MANIFEST})
    return [f for f in written if not f.endswith(".tmp")]


def read_manifest(path) -> dict:
    file = os.path.join(str(path), MANIFEST)
    if not os.path.isfile(file):
        raise CheckpointError(f"{path} is not a pyprune compressed checkpoint: no {MANIFEST}")
    try:
        with open(file) as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{file} is unreadable or not valid JSON: {exc}") from None
    if manifest.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{file}: format is {manifest.get('format')!r}, expected {FORMAT_NAME!r}")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
        raise CheckpointError(
            f"{file}: format_version {version!r} is not supported by pyprune {__version__} "
            f"(supported: 1..{FORMAT_VERSION})"
        )
    for key in ("model_config", "modules", "tensors", "aliases", "weights_file"):
        if key not in manifest:
            raise CheckpointError(f"{file}: the manifest has no {key!r} entry")
    return manifest


def _read_tensors(path, manifest, verify: bool) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = os.path.join(str(path), manifest["weights_file"]["name"])
    if not os.path.isfile(file):
        raise CheckpointError(f"weights file {file} is missing")
    size, expected = os.path.getsize(file), manifest["weights_file"]["bytes"]
    if size != expected:
        raise CheckpointError(f"weights file {file} has {size} bytes, the manifest says {expected}: truncated or replaced")
    try:
        tensors = load_file(file)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"weights file {file} is corrupt: {exc}") from None
    table = manifest["tensors"]
    if set(tensors) != set(table):
        missing, extra = sorted(set(table) - set(tensors)), sorted(set(tensors) - set(table))
        raise CheckpointError(f"weights file {file} does not match the manifest: missing {missing[:5]}, unexpected {extra[:5]}")
    for key, t in tensors.items():
        entry = table[key]
        if _dtype_name(t.dtype) != entry["dtype"] or list(t.shape) != entry["shape"]:
            raise CheckpointError(
                f"{file}: tensor {key!r} is {_dtype_name(t.dtype)} {list(t.shape)}, "
                f"the manifest says {entry['dtype']} {entry['shape']}"
            )
        if verify and _sha256(t) != entry["sha256"]:
            raise CheckpointError(f"{file}: checksum mismatch for tensor {key!r}: the file was modified or is corrupt")
    return tensors


@contextlib.contextmanager
def _parameters_on_meta():
    """Create every nn.Parameter on the meta device (no memory, no random init) while buffers
    (e.g. rotary inverse frequencies, which are not saved) are built normally."""
    original = nn.Module.register_parameter

    def register(module, name, param):
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def _build_skeleton(manifest):
    import transformers
    from transformers import AutoModelForCausalLM

    cfg = dict(manifest["model_config"])
    model_type = cfg.get("model_type")
    if model_type not in transformers.CONFIG_MAPPING:
        raise CheckpointError(f"model_type {model_type!r} is unknown to transformers {transformers.__version__}")
    config = transformers.CONFIG_MAPPING[model_type].from_dict(cfg)
    dense_dtype = getattr(torch, manifest.get("dense_dtype", "float32"))
    with _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dense_dtype)
    for name, layout in manifest["modules"].items():
        kind = layout.get("kind")
        if kind not in MODULES:
            raise CheckpointError(f"module {name!r} has unknown packed format {kind!r}")
        try:
            model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"the manifest names module {name!r}, which the model does not have") from None
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, MODULES[kind].from_layout(layout))
    return model


def _cast_dense(model, dtype):
    """Cast the dense parameters/buffers (and biases of packed modules) to ``dtype``; packed
    codes, metadata, scales and 2:4 values keep their stored dtypes."""
    for module in model.modules():
        if isinstance(module, CompressedLinear):
            if module.bias is not None:
                module.bias = module.bias.to(dtype)
            continue
        for name, p in list(module._parameters.items()):
            if p is not None and p.is_floating_point():
                module._parameters[name] = nn.Parameter(p.data.to(dtype), requires_grad=p.requires_grad)
        for name, b in list(module._buffers.items()):
            if b is not None and b.is_floating_point() and name not in module._non_persistent_buffers_set:
                module._buffers[name] = b.to(dtype)


def load(path, device=None, dtype=None, verify: bool = True) -> nn.Module:
    """Rebuild the Hugging Face model saved by :func:`save_compressed` (in eval mode).

    ``device``: where to put it (default: CPU). ``dtype``: cast the dense parts (embeddings,
    norms, lm_head, biases) to this dtype, e.g. float32 for CPU evaluation; packed tensors keep
    their format. ``verify``: check every tensor's sha256 (file size and shapes are always
    checked). Raises CheckpointError on anything missing, truncated or tampered with."""
    manifest = read_manifest(path)
    tensors = _read_tensors(path, manifest, verify)
    for alias, source in manifest["aliases"].items():
        if source not in tensors:
            raise CheckpointError(f"alias {alias!r} points to {source!r}, which is not in the weights file")
        tensors[alias] = tensors[source]
    model = _build_skeleton(manifest)
    result = model.load_state_dict(tensors, strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"{path}: checkpoint does not fit the model: missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    still_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "meta"]
    if still_meta:
        raise CheckpointError(f"{path}: no stored value for {still_meta[:5]}")
    for name, module in model.named_modules():
        if isinstance(module, CompressedLinear):
            try:
                module.packed().validate()
            except ValueError as exc:
                raise CheckpointError(f"{path}: module {name!r}: {exc}") from None
    if dtype is not None:
        _cast_dense(model, dtype)
    if device is not None:
        model.to(device)
    model.eval()
    return model


def load_tokenizer(path):
    """The tokenizer saved with the checkpoint, or None."""
    manifest = read_manifest(path)
    if not manifest.get("tokenizer_files"):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def checkpoint_size(path) -> dict:
    """The size summary of a saved checkpoint (on-disk bytes vs fp16)."""
    return read_manifest(path)["size"]
