"""Pruning a model larger than RAM: decoder layers streamed from a safetensors checkpoint folder.

The model is built as a skeleton whose parameters live on the ``meta`` device (no memory; the
computed buffers such as rotary frequencies stay real). The sequential pipeline then runs as
usual, except that

- each decoder layer's tensors are read from the checkpoint just before the layer is processed,
  and written out (pruned) to its own shard right after, then dropped;
- the embeddings (and whatever else runs before layer 0) are read only while the inputs of
  layer 0 are captured; the output head is never read, only copied from shard to shard at the end.

Peak memory is about one decoder layer plus the calibration activations (which can themselves go
to disk, ``--activations disk``) plus one layer's statistics, instead of the whole model.

The output folder is an ordinary Hugging Face checkpoint: ``model-XXXXX-of-YYYYY.safetensors``
shards (one per decoder layer, then the other tensors), ``model.safetensors.index.json``, and the
config and tokenizer files of the source folder. The tensor names and the set of tensors are those
of the source checkpoint; each tensor keeps its source dtype unless ``save_dtype`` is given.

With a progress folder, a killed run resumes after the last layer written: the shards already in
the output folder are the pruned weights, the progress folder holds the next inputs and records.

Reading and writing use the safetensors layout directly (an 8-byte header length, a JSON header,
then the raw tensor bytes) with plain file I/O, so neither a memory map of a whole shard nor a
serialised copy of a whole shard is ever resident.
"""
import contextlib
import ctypes
import ctypes.util
import dataclasses
import json
import os
import shutil
import struct
import sys
import time
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from pyprune.models.families import decoder_layers, find_layer_list_path

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5", ".ckpt")

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("U16", "uint16"),
                     ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        _DTYPES[_name] = getattr(torch, _attr)
_CODES = {v: k for k, v in _DTYPES.items()}


# -- safetensors files ------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TensorEntry:
    path: str  # shard file
    dtype: torch.dtype
    shape: Tuple[int, ...]
    begin: int  # absolute byte offsets in the file
    end: int


def read_header(path: str) -> Tuple[dict, int]:
    """``(header dict, offset of the data section)`` of a safetensors file."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (length,) = struct.unpack("<Q", raw)
        if length > 100 << 20:
            raise ValueError(f"{path}: safetensors header of {length} bytes is implausible; the file is corrupt")
        header = json.loads(f.read(length))
    return header, 8 + length


class CheckpointIndex:
    """Where each tensor of a safetensors checkpoint folder is (reads only the shard headers)."""

    def __init__(self, folder: str):
        self.folder = folder
        index_path = os.path.join(folder, INDEX_NAME)
        if os.path.isfile(index_path):
            with open(index_path) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        elif os.path.isfile(os.path.join(folder, SINGLE_NAME)):
            files = [SINGLE_NAME]
        else:
            raise FileNotFoundError(
                f"{folder} has neither {INDEX_NAME} nor {SINGLE_NAME}: streaming reads a safetensors "
                "checkpoint folder as save_pretrained writes it")
        self.entries: Dict[str, TensorEntry] = {}
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{INDEX_NAME} in {folder} lists {name}, which does not exist")
            header, data_start = read_header(path)
            for key, info in header.items():
                if key == "__metadata__":
                    continue
                if info["dtype"] not in _DTYPES:
                    raise ValueError(f"{path}: tensor {key} has dtype {info['dtype']}, which this torch cannot hold")
                begin, end = info["data_offsets"]
                self.entries[key] = TensorEntry(path, _DTYPES[info["dtype"]], tuple(info["shape"]),
                                                data_start + begin, data_start + end)

    def nbytes(self, key: str) -> int:
        e = self.entries[key]
        return e.end - e.begin

    def read(self, key: str) -> torch.Tensor:
        """One tensor, read with plain file I/O into its own memory."""
        e = self.entries[key]
        return self._read_bytes(key, e.begin, e.end - e.begin).view(e.dtype).reshape(e.shape)

    def read_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` (first dimension) of a tensor."""
        e = self.entries[key]
        row = (e.end - e.begin) // max(e.shape[0], 1)
        return self._read_bytes(key, e.begin + start * row, (stop - start) * row).view(e.dtype).reshape(
            (stop - start,) + e.shape[1:])

    def _read_bytes(self, key, offset, count) -> torch.Tensor:
        e = self.entries[key]
        out = torch.empty(count, dtype=torch.uint8)
        with open(e.path, "rb") as f:
            f.seek(offset)
            view = memoryview(out.numpy())
            done = 0
            while done < len(view):
                n = f.readinto(view[done:])
                if not n:
                    raise ValueError(f"{e.path}: file ends inside tensor {key}; the checkpoint is truncated")
                done += n
        return out


class StoredTensor:
    """A tensor of a checkpoint, read in blocks of rows when written out (a copy of a large tensor,
    such as an embedding, never holds it whole)."""

    def __init__(self, index: CheckpointIndex, key: str, block_bytes: int = 64 << 20):
        self.index, self.key, self.block_bytes = index, key, block_bytes
        entry = index.entries[key]
        self.shape, self.dtype = torch.Size(entry.shape), entry.dtype

    def numel(self) -> int:
        return self.shape.numel()

    def blocks(self):
        if len(self.shape) == 0:
            yield self.index.read(self.key)
            return
        rows = self.shape[0]
        per_row = max(1, self.index.nbytes(self.key) // max(rows, 1))
        step = max(1, self.block_bytes // per_row)
        for start in range(0, rows, step):
            yield self.index.read_rows(self.key, start, min(rows, start + step))


def write_safetensors(path: str, tensors: Dict[str, torch.Tensor], dtypes: Dict[str, torch.dtype]):
    """Write ``tensors`` (each converted to ``dtypes[name]`` on the fly, one at a time; a
    :class:`StoredTensor` block by block) as one safetensors file; written to a temporary name,
    then renamed."""
    header, offset = {}, 0
    for name, t in tensors.items():
        dtype = dtypes[name]
        nbytes = t.numel() * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _CODES[dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, t in tensors.items():
            for block in (t.blocks() if isinstance(t, StoredTensor) else (t,)):
                data = block.detach().to("cpu", dtypes[name]).contiguous()
                if data.numel():
                    f.write(memoryview(data.reshape(-1).view(torch.uint8).numpy()))
    os.replace(tmp, path)  # a killed process leaves either the old file or the complete new one


def is_checkpoint_folder(path: str) -> bool:
    """True for a local folder holding a safetensors checkpoint (sharded or single file)."""
    return os.path.isdir(path) and (os.path.isfile(os.path.join(path, INDEX_NAME))
                                    or os.path.isfile(os.path.join(path, SINGLE_NAME)))


def is_sharded_checkpoint(path: str) -> bool:
    """True for a local folder with ``model.safetensors.index.json`` (the default to stream)."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, INDEX_NAME))


# -- the skeleton -------------------------------------------------------------------------------

@contextlib.contextmanager
def parameters_on_meta():
    """Parameters registered inside go to the ``meta`` device; buffers stay real, because the
    computed ones (rotary frequencies, ALiBi slopes) are not in checkpoints."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None:
            p = module._parameters[name]
            module._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def load_skeleton(model_dir: str, dtype=None):
    """The ``*ForCausalLM`` model of ``model_dir`` with every parameter on ``meta`` (eval mode, KV
    cache off); ``dtype`` defaults to the dtype the config declares, else float32."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    if dtype is None:
        dtype = (config.dtype if hasattr(config, "dtype") else getattr(config, "torch_dtype", None)) or torch.float32
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    model.config.use_cache = False
    return model


def checkpoint_key_renamer(model):
    """``rename(key) -> (model name, converter or None)``: how ``transformers`` maps a checkpoint
    key to the model's state-dict name (legacy names such as GPT-NeoX's ``embed_out``, the base
    model prefix). A converter means the tensor is reshaped or fused on load (not one to one)."""
    base = getattr(model, "base_model_prefix", "") or ""
    names = model.state_dict()
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, rename_source_key

        transforms = get_model_conversion_mapping(model)
        renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]

        def rename(key):
            return rename_source_key(key, renamings, converters, base or None, names)
    except ImportError:  # an older transformers: names are the state-dict names, maybe without the prefix
        def rename(key):
            if key not in names and base and f"{base}.{key}" in names:
                return f"{base}.{key}", None
            if key not in names and base and key.startswith(base + ".") and key[len(base) + 1:] in names:
                return key[len(base) + 1:], None
            return key, None
    return rename


def _set_tensor(root: nn.Module, name: str, value: torch.Tensor):
    module_name, _, attr = name.rpartition(".")
    module = root.get_submodule(module_name) if module_name else root
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(value, requires_grad=False)
    elif attr in module._buffers:
        module._buffers[attr] = value
    else:
        raise KeyError(f"{name} is neither a parameter nor a buffer of the model")


_LIBC = None


def _libc():
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
            _LIBC.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        except (OSError, AttributeError):
            _LIBC = False
    return _LIBC


def trim_heap():
    """Hand freed heap memory back to the OS (glibc ``malloc_trim``).

    Tensors of a few MiB are served from the malloc heap once glibc has raised its mmap
    threshold; after a layer is dropped that memory stays mapped to the process, and without a
    trim the resident size creeps up layer after layer. A no-op where glibc is not the allocator.
    """
    if _libc():
        _libc().malloc_trim(0)


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def map_large_allocations(threshold: int = 1 << 20):
    """Serve every allocation above ``threshold`` bytes with its own mmap, returned on free.

    glibc raises its mmap threshold (up to 32 MiB) each time a mapped block is freed, after which
    the solver's multi-MiB temporaries live in the heap and the resident size keeps the high-water
    mark of all of them. Setting the threshold fixes it and turns that adjustment off; the cost is
    a page fault per page of each large tensor, small next to the layer's compute.
    """
    if _libc():
        _libc().mallopt(M_MMAP_THRESHOLD, int(threshold))


def _release_tensor(root: nn.Module, name: str):
    """Put parameter ``name`` back on ``meta`` (buffers are small and kept)."""
    module_name, _, attr = name.rpartition(".")
    module = root.get_submodule(module_name) if module_name else root
    p = module._parameters.get(attr)
    if p is not None and p.device.type != "meta":
        module._parameters[attr] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"),
                                                requires_grad=False)


def _to_meta(module: nn.Module):
    """Drop the memory of every parameter of ``module`` (buffers are small and kept)."""
    for sub in module.modules():
        for attr, p in list(sub._parameters.items()):
            if p is not None and p.device.type != "meta":
                sub._parameters[attr] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"),
                                                     requires_grad=False)


# -- the layer streamer (the pipeline's layer_io) -----------------------------------------------

class PauseRun(Exception):
    """Raised by :class:`LayerStreamer` when the per-call layer budget is spent."""


class LayerStreamer:
    """Loads decoder layers from ``model_dir`` into ``model`` (a skeleton) and writes them pruned
    to ``out_dir``. Used by the pipeline through ``load_layer``/``store_layer``/``capturing``.

    ``writer``: whether this process writes files (rank 0 of a distributed run); ``max_layers``:
    how many layers this call may load before raising :class:`PauseRun`.
    """

    def __init__(self, model, model_dir: str, out_dir: str, save_dtype=None, writer: bool = True,
                 max_layers: Optional[int] = None):
        self.model = model
        self.index = CheckpointIndex(model_dir)
        self.out_dir = out_dir
        self.save_dtype = save_dtype
        self.writer = writer
        self.max_layers = max_layers
        self.loaded = 0
        self.prefix = find_layer_list_path(model)
        self.layers = decoder_layers(model)
        self.compute_dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        self._map_keys()
        self.nfiles = len(self.layers) + len(self.other_groups)

    # -- key bookkeeping
    def _map_keys(self):
        rename = checkpoint_key_renamer(self.model)
        model_names = set(self.model.state_dict().keys())
        self.to_model: Dict[str, Optional[str]] = {}  # checkpoint key -> model name (None: unused)
        unknown = []
        for key in self.index.entries:
            name, converted = rename(key)
            if converted is not None:
                raise ValueError(f"checkpoint tensor {key} must be converted ({converted}) before this model can "
                                 "use it; streaming supports checkpoints whose tensors map one to one")
            self.to_model[key] = name if name in model_names else None
            if name not in model_names:
                unknown.append(key)
        if unknown:
            print(f"note: {len(unknown)} checkpoint tensors match no model parameter and are copied unchanged "
                  f"(e.g. {unknown[0]})", file=sys.stderr)
        self.layer_keys: List[List[str]] = [[] for _ in self.layers]
        other = []
        for key, name in self.to_model.items():
            layer = self._layer_of(name or key)
            (self.layer_keys[layer] if layer is not None else other).append(key)
        loaded = {self.to_model[k] for keys in self.layer_keys for k in keys}
        for i, layer in enumerate(self.layers):
            for local, _ in layer.named_parameters():
                if f"{self.prefix}.{i}.{local}" not in loaded:
                    raise ValueError(f"the checkpoint in {self.index.folder} lacks {self.prefix}.{i}.{local}; "
                                     "cannot stream this model")
        # Other tensors go to shards of at most the largest layer's size (one big tensor alone).
        budget = max([sum(self.index.nbytes(k) for k in keys) for keys in self.layer_keys] + [1])
        self.other_groups: List[List[str]] = []
        size = budget
        for key in sorted(other):
            n = self.index.nbytes(key)
            if not self.other_groups or size + n > budget:
                self.other_groups.append([])
                size = 0
            self.other_groups[-1].append(key)
            size += n
        # Loaded for capturing layer 0's inputs: every non-layer tensor except the output head's.
        head = self._head_slot()
        head_prefix = head[2] + "." if head is not None else None
        self.capture_keys = [k for k in other if self.to_model[k] is not None
                             and not (head_prefix and self.to_model[k].startswith(head_prefix))]

    def _head_slot(self):
        """``(parent module, attribute, dotted name)`` of the output head, or None."""
        get = getattr(self.model, "get_output_embeddings", None)
        head = get() if get is not None else None
        if head is None:
            return None
        for name, module in self.model.named_modules():
            if module is head and name:
                parent_name, _, attr = name.rpartition(".")
                return (self.model.get_submodule(parent_name) if parent_name else self.model, attr, name)
        return None

    def _layer_of(self, name: str) -> Optional[int]:
        if not name.startswith(self.prefix + "."):
            return None
        head = name[len(self.prefix) + 1:].split(".", 1)[0]
        return int(head) if head.isdigit() and int(head) < len(self.layers) else None

    def _dtype_for(self, key: str) -> torch.dtype:
        source = self.index.entries[key].dtype
        return self.save_dtype if (self.save_dtype is not None and source.is_floating_point) else source

    def layer_file(self, index: int) -> str:
        return f"model-{index + 1:05d}-of-{self.nfiles:05d}.safetensors"

    def other_file(self, group: int) -> str:
        return f"model-{len(self.layers) + group + 1:05d}-of-{self.nfiles:05d}.safetensors"

    def _read(self, key: str) -> torch.Tensor:
        value = self.index.read(key)
        return value.to(self.compute_dtype) if value.is_floating_point() else value

    def _load(self, key: str):
        _set_tensor(self.model, self.to_model[key], self._read(key))

    # -- the pipeline hooks
    @contextlib.contextmanager
    def capturing(self, tokens: Optional[torch.Tensor] = None):
        """Everything that runs before decoder layer 0 is loaded for the duration; the output
        head is swapped for a placeholder so that no code touches its meta tensors. With the
        calibration ``tokens``, the token embedding gets only their rows (the other rows are
        allocated but never written or read, so they take no memory)."""
        head = self._head_slot()
        embedding = self._embedding_key() if tokens is not None else None
        original = getattr(head[0], head[1]) if head is not None else None
        try:
            for key in self.capture_keys:
                if key == embedding:
                    self._load_rows(key, tokens)
                else:
                    self._load(key)
            if head is not None:
                setattr(head[0], head[1], nn.Identity())
            yield
        finally:
            if head is not None:
                setattr(head[0], head[1], original)
            for key in self.capture_keys:
                _release_tensor(self.model, self.to_model[key])
            trim_heap()

    def _embedding_key(self) -> Optional[str]:
        """The checkpoint key of the token embedding's weight (None when it cannot be told)."""
        get = getattr(self.model, "get_input_embeddings", None)
        embed = get() if get is not None else None
        if not isinstance(embed, nn.Embedding):
            return None
        name = next((n for n, m in self.model.named_modules() if m is embed and n), None)
        wanted = f"{name}.weight" if name else None
        return next((k for k, v in self.to_model.items() if v == wanted), None)

    def _load_rows(self, key: str, tokens: torch.Tensor):
        entry = self.index.entries[key]
        weight = torch.empty(entry.shape, dtype=self.compute_dtype if entry.dtype.is_floating_point else entry.dtype)
        ids = torch.unique(tokens.reshape(-1)).tolist()
        if ids and (ids[0] < 0 or ids[-1] >= entry.shape[0]):
            raise ValueError(f"calibration token ids span {ids[0]}..{ids[-1]}, outside the vocabulary of "
                             f"{entry.shape[0]} rows of {key}")
        start = 0
        while start < len(ids):  # runs of consecutive ids are read together
            stop = start + 1
            while stop < len(ids) and ids[stop] == ids[stop - 1] + 1:
                stop += 1
            weight[ids[start]:ids[stop - 1] + 1] = self.index.read_rows(key, ids[start], ids[stop - 1] + 1)
            start = stop
        _set_tensor(self.model, self.to_model[key], weight)

    def load_layer(self, index: int) -> nn.Module:
        if self.max_layers is not None and self.loaded >= self.max_layers:
            raise PauseRun(index)
        self.loaded += 1
        prefix = f"{self.prefix}.{index}."
        layer = self.layers[index]
        for key in self.layer_keys[index]:
            name = self.to_model[key]
            if name is not None:
                _set_tensor(layer, name[len(prefix):], self._read(key))
        return layer

    def store_layer(self, index: int, layer: nn.Module):
        if self.writer:
            prefix = f"{self.prefix}.{index}."
            own = dict(layer.state_dict(keep_vars=False))
            tensors, dtypes = {}, {}
            for key in self.layer_keys[index]:
                name = self.to_model[key]
                tensors[key] = own[name[len(prefix):]] if name is not None else StoredTensor(self.index, key)
                dtypes[key] = self._dtype_for(key)
            os.makedirs(self.out_dir, exist_ok=True)
            write_safetensors(os.path.join(self.out_dir, self.layer_file(index)), tensors, dtypes)
        _to_meta(layer)
        for sub in layer.modules():  # buffers back from the compute device
            for attr, b in list(sub._buffers.items()):
                if b is not None and b.device.type not in ("cpu", "meta"):
                    sub._buffers[attr] = b.to("cpu")
        trim_heap()

    # -- the rest of the checkpoint
    def finish(self, source_dir: str):
        """Write the other tensors, the index, and copy config/tokenizer files (writer only)."""
        if not self.writer:
            return
        weight_map, total = {}, 0
        for group, keys in enumerate(self.other_groups):
            tensors = {key: StoredTensor(self.index, key) for key in keys}
            write_safetensors(os.path.join(self.out_dir, self.other_file(group)), tensors,
                              {key: self._dtype_for(key) for key in keys})
            weight_map.update({key: self.other_file(group) for key in keys})
        for index, keys in enumerate(self.layer_keys):
            path = os.path.join(self.out_dir, self.layer_file(index))
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path} is missing: layer {index} was never written")
            weight_map.update({key: self.layer_file(index) for key in keys})
        for key in weight_map:
            total += _nbytes(self.index.entries[key].shape, self._dtype_for(key))
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        tmp = os.path.join(self.out_dir, INDEX_NAME + ".tmp")
        with open(tmp, "w") as f:
            json.dump(index, f, indent=2)
        os.replace(tmp, os.path.join(self.out_dir, INDEX_NAME))
        for name in sorted(os.listdir(source_dir)):
            src = os.path.join(source_dir, name)
            if os.path.isfile(src) and not name.endswith(_WEIGHT_SUFFIXES) and name != INDEX_NAME:
                shutil.copyfile(src, os.path.join(self.out_dir, name))
        if self.save_dtype is not None:
            _set_config_dtype(os.path.join(self.out_dir, "config.json"), self.save_dtype)

    def written_layers(self) -> List[int]:
        return [i for i in range(len(self.layers))
                if os.path.isfile(os.path.join(self.out_dir, self.layer_file(i)))]


def _nbytes(shape, dtype) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n * torch.empty((), dtype=dtype).element_size()


def _set_config_dtype(path: str, dtype: torch.dtype):
    if not os.path.isfile(path):
        return
    with open(path) as f:
        config = json.load(f)
    name = str(dtype).replace("torch.", "")
    for key in ("dtype", "torch_dtype"):
        if key in config:
            config[key] = name
    with open(path, "w") as f:
        json.dump(config, f, indent=2)


# -- the entry point ------------------------------------------------------------------------------

def prune_streamed(model_dir: str, out_dir: str, tokens: Optional[torch.Tensor], method, schedule,
                   solver_options=None, options=None, post_solve=None, dtype=None, save_dtype=None,
                   max_layers: Optional[int] = None) -> dict:
    """Prune the checkpoint in ``model_dir`` layer by layer into ``out_dir`` (see the module doc).

    ``dtype``: compute dtype of the layers (default: the config's dtype); ``save_dtype``: dtype of
    the written floating-point tensors (default: each tensor's dtype in the source checkpoint);
    ``max_layers``: stop after this many layers in this call (resume later with the same progress
    folder). ``options`` is the pipeline's :class:`RunOptions` (device, activations, progress
    folder, resume, distributed). Returns the pipeline's result plus ``complete`` (False when
    paused), ``out_dir`` and ``streamed: True``.
    """
    from pyprune.pipeline.runner import RunOptions, prune_model

    options = options or RunOptions()
    if not is_checkpoint_folder(model_dir):
        raise FileNotFoundError(f"{model_dir} is not a folder holding a safetensors checkpoint "
                                f"({INDEX_NAME} or {SINGLE_NAME})")
    if os.path.realpath(model_dir) == os.path.realpath(out_dir):
        raise ValueError(f"the output folder {out_dir} is the source folder; choose another --out")
    if max_layers is not None and max_layers < 1:
        raise ValueError(f"max_layers={max_layers}: must be at least 1 (or None for all layers)")
    dist = getattr(options, "distributed", None)
    writer = dist is None or dist.is_main
    map_large_allocations()  # the resident size then follows the live tensors, not their high-water mark
    model = load_skeleton(model_dir, dtype)
    streamer = LayerStreamer(model, model_dir, out_dir, save_dtype=save_dtype, writer=writer,
                             max_layers=max_layers)
    fingerprint = dict(options.fingerprint, streamed=True, out=os.path.abspath(out_dir),
                       save_dtype=str(save_dtype) if save_dtype is not None else "source",
                       compute_dtype=str(streamer.compute_dtype))
    options = dataclasses.replace(options, fingerprint=fingerprint)
    if options.resume and options.progress_dir:
        _check_resumable(options.progress_dir, streamer, dist)
    t0 = time.time()
    try:
        result = prune_model(model, tokens, method, schedule, solver_options, options, post_solve,
                             layer_io=streamer)
    except PauseRun as pause:
        return {"complete": False, "next_layer": pause.args[0], "out_dir": out_dir, "streamed": True,
                "seconds": time.time() - t0}
    if dist is not None:
        dist.barrier()
    streamer.finish(model_dir)
    return dict(result, complete=True, out_dir=out_dir, streamed=True)


def _check_resumable(progress_dir: str, streamer: LayerStreamer, dist):
    """Every layer the progress folder counts as done must have its shard in the output folder."""
    folder = progress_dir if dist is None else os.path.join(progress_dir, f"rank{dist.rank}")
    state_path = os.path.join(folder, "state.json")
    if not os.path.isfile(state_path) or not streamer.writer:
        return
    with open(state_path) as f:
        done = json.load(f).get("next_layer", 0)
    written = set(streamer.written_layers())
    missing = [i for i in range(done) if i not in written]
    if missing:
        raise FileNotFoundError(f"cannot resume: {progress_dir} counts layers 0..{done - 1} as done but "
                                f"{streamer.out_dir} lacks the shards of layers {missing}")
