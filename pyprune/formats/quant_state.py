"""The INT4 sidecar: per-Linear integer weights, scales and mask saved next to a model.

A model saved with ``save_pretrained`` holds dequantized weights (exact in float32, rounded in
float16/bfloat16); the sidecar ``pyprune_int4.safetensors`` in the same folder holds the truth
for every quantized Linear ``NAME`` (its module path in the model):

* ``NAME.qweight``: int8 ``[out, in]``, codes in -8..7, 0 wherever pruned;
* ``NAME.scales``:  float16 ``[out, in // groupsize]`` (the format of ``pyprune.ops.int4_grid``);
* ``NAME.pruned``:  bool ``[out, in]``, True = removed (kept weights may also have code 0, so
  the mask is stored rather than inferred from zeros).

The safetensors metadata holds ``format``/``version``, a JSON ``layers`` table (group size and
shape of each Linear) and a JSON ``sha256`` table of every tensor's bytes, so corruption that
keeps the file parseable is caught too. Loading validates everything and raises
:class:`QuantStateError` naming the file, the layer and what is wrong.
"""
import hashlib
import json
import os
from typing import Dict, Mapping, Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from pyprune.ops import int4_grid
from pyprune.solvers.quant_result import QuantCodes

# What a load returns per Linear: codes, scales (float32, fp16-exact), mask, resolved group size.
QuantState = QuantCodes

SIDECAR_NAME = "pyprune_int4.safetensors"
FORMAT = "pyprune-int4"
VERSION = 1


class QuantStateError(ValueError):
    """A sidecar is missing, corrupt or inconsistent."""


def sidecar_path(path: str) -> str:
    """The sidecar file for a model folder (or the file itself when a file path is given)."""
    return os.path.join(path, SIDECAR_NAME) if os.path.isdir(path) or not path.endswith(".safetensors") else path


def save_quant_state(path: str, states: Mapping[str, object], metadata: Optional[dict] = None) -> str:
    """Write ``states`` (name -> QuantResult or QuantCodes) into the sidecar of ``path``.

    ``path`` is a model folder (created if needed) or a ``.safetensors`` file path. ``metadata``
    (JSON-serialisable) is stored under the key ``user``. Returns the file written. The write is
    atomic: an interrupted save leaves any previous sidecar intact.
    """
    if not states:
        raise ValueError("no quantized layers to save")
    file = sidecar_path(path)
    os.makedirs(os.path.dirname(os.path.abspath(file)), exist_ok=True)
    tensors, layers = {}, {}
    for name, state in states.items():
        if name.endswith((".qweight", ".scales", ".pruned")):
            raise ValueError(f"layer name {name!r} ends with a reserved suffix")
        qweight, scales, pruned, g = _validated(name, state.qweight, state.scales.float(), state.pruned, state.groupsize)
        tensors[f"{name}.qweight"] = qweight.detach().to("cpu", torch.int8).contiguous()
        tensors[f"{name}.scales"] = scales.detach().to("cpu", torch.float16).contiguous()
        tensors[f"{name}.pruned"] = pruned.detach().to("cpu", torch.bool).contiguous()
        layers[name] = {"groupsize": g, "shape": list(qweight.shape)}
    meta = {
        "format": FORMAT,
        "version": str(VERSION),
        "layers": json.dumps(layers, sort_keys=True),
        "sha256": json.dumps({key: _digest(t) for key, t in tensors.items()}, sort_keys=True),
        "user": json.dumps(metadata or {}, sort_keys=True),
    }
    tmp = file + ".tmp"
    save_file(tensors, tmp, metadata=meta)
    os.replace(tmp, file)
    return file


def load_quant_state(path: str, device="cpu") -> Dict[str, QuantState]:
    """Read and fully validate a sidecar (a model folder or the file); name -> QuantState."""
    file = sidecar_path(path)
    if not os.path.isfile(file):
        raise QuantStateError(f"no INT4 sidecar at {file}: the model was not saved with quantization")
    try:
        tensors = load_file(file)
        meta = _metadata(file)
    except (SafetensorError, OSError, ValueError) as exc:
        raise QuantStateError(f"INT4 sidecar {file} is corrupt or not a safetensors file: {exc}") from None
    if meta.get("format") != FORMAT or meta.get("version") != str(VERSION):
        raise QuantStateError(
            f"{file} is not a {FORMAT} v{VERSION} sidecar (format={meta.get('format')!r}, "
            f"version={meta.get('version')!r})"
        )
    try:
        layers = json.loads(meta["layers"])
        digests = json.loads(meta["sha256"])
    except (KeyError, json.JSONDecodeError) as exc:
        raise QuantStateError(f"INT4 sidecar {file} has corrupt metadata: {exc}") from None
    states = {}
    for name, entry in layers.items():
        parts = {}
        for suffix in ("qweight", "scales", "pruned"):
            key = f"{name}.{suffix}"
            if key not in tensors:
                raise QuantStateError(f"INT4 sidecar {file}: layer {name!r} has no tensor {key!r}")
            if digests.get(key) != _digest(tensors[key]):
                raise QuantStateError(f"INT4 sidecar {file}: checksum mismatch for {key!r} (the file is corrupt)")
            parts[suffix] = tensors[key]
        try:
            qweight, scales, pruned, g = _validated(
                name, parts["qweight"], parts["scales"].float(), parts["pruned"], int(entry["groupsize"])
            )
        except ValueError as exc:
            raise QuantStateError(f"INT4 sidecar {file}: {exc}") from None
        if list(qweight.shape) != list(entry["shape"]):
            raise QuantStateError(f"INT4 sidecar {file}: layer {name!r} has shape {list(qweight.shape)}, table says {entry['shape']}")
        states[name] = QuantState(qweight.to(device), scales.to(device), pruned.to(device), g)
    return states


def read_user_metadata(path: str) -> dict:
    """The ``metadata`` given to :func:`save_quant_state`."""
    return json.loads(_metadata(sidecar_path(path)).get("user", "{}"))


def apply_quant_state(model, states: Mapping[str, QuantState]) -> None:
    """Write every state's dequantized weight into the model's module of the same name.

    The weight is cast to the module's dtype (exact in float32). Raises before changing anything
    when a module is missing or a shape does not match.
    """
    from pyprune.models.families import set_weight_matrix, weight_matrix

    modules = dict(model.named_modules())
    for name, state in states.items():
        if name not in modules:
            raise QuantStateError(f"the model has no module {name!r} named in the INT4 sidecar")
        shape = tuple(weight_matrix(modules[name]).shape)
        if shape != tuple(state.qweight.shape):
            raise QuantStateError(f"module {name!r} has weight {shape}, the sidecar has {tuple(state.qweight.shape)}")
    for name, state in states.items():
        W = weight_matrix(modules[name])
        set_weight_matrix(modules[name], state.dequantize().to(device=W.device, dtype=W.dtype))


def _validated(name, qweight, scales, pruned, groupsize):
    """Check one layer's tensors against the format; returns them with the resolved group size."""
    if qweight.dim() != 2:
        raise ValueError(f"layer {name!r}: qweight must be 2-D, got shape {tuple(qweight.shape)}")
    rows, cols = qweight.shape
    if qweight.is_floating_point() or qweight.dtype == torch.bool:
        raise ValueError(f"layer {name!r}: qweight must hold integers, got {qweight.dtype}")
    if int(qweight.min()) < int4_grid.QMIN or int(qweight.max()) > int4_grid.QMAX:
        raise ValueError(f"layer {name!r}: codes outside {int4_grid.QMIN}..{int4_grid.QMAX}")
    try:
        g = int4_grid.check_groupsize(int(groupsize), cols)
    except ValueError as exc:
        raise ValueError(f"layer {name!r}: {exc}") from None
    if tuple(scales.shape) != (rows, cols // g):
        raise ValueError(f"layer {name!r}: scales must be [{rows}, {cols // g}], got {tuple(scales.shape)}")
    try:
        int4_grid.check_scales(scales)
    except ValueError as exc:
        raise ValueError(f"layer {name!r}: {exc}") from None
    if pruned.dtype != torch.bool or tuple(pruned.shape) != (rows, cols):
        raise ValueError(f"layer {name!r}: mask must be bool [{rows}, {cols}], got {pruned.dtype} {tuple(pruned.shape)}")
    if qweight[pruned].any():
        raise ValueError(f"layer {name!r}: a pruned weight has a nonzero code")
    return qweight, scales, pruned, g


def _digest(t: torch.Tensor) -> str:
    data = t.contiguous().view(torch.uint8) if t.dtype != torch.bool else t.contiguous().to(torch.uint8)
    return hashlib.sha256(data.numpy().tobytes()).hexdigest()


def _metadata(file) -> dict:
    with safe_open(file, framework="pt") as handle:
        return handle.metadata() or {}
