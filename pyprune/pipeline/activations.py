"""Where the calibration activations live between decoder layers: ``device``, ``cpu`` or ``disk``.

The pipeline keeps two copies of the activations while a layer runs: its inputs and the outputs
it produces for the next layer (``nsamples x seqlen x hidden`` each, in the model's dtype).

- ``device``: both copies on the compute device (fastest; needs the device memory).
- ``cpu``: both copies in CPU RAM; one batch at a time goes to the device.
- ``disk``: both copies in memory-mapped files; one batch at a time is read into RAM (and the
  device) and written back, and its pages are dropped from the process right after, so the
  resident memory holds about one batch. Put the files on a real disk, not a tmpfs.

:class:`ActivationStore` is the only code that touches these buffers; for ``device`` and ``cpu``
it does exactly what the pipeline always did. :func:`estimate_activation_memory` gives the
memory each choice needs, for printing before a run.
"""
import mmap
import os
import shutil
import tempfile
import weakref
from dataclasses import dataclass
from typing import Optional

import torch

from pyprune.models.capture import capture_layer0_inputs

STORAGE_CHOICES = ("device", "cpu", "disk")

# Samples captured per call in disk mode: enough to keep the embedding moves cheap, small enough
# that the chunk held in RAM before it reaches the file stays small.
_CAPTURE_CHUNK_BYTES = 64 << 20


def check_storage(kind: str) -> str:
    if kind not in STORAGE_CHOICES:
        raise ValueError(f"activations={kind!r}; allowed: {', '.join(STORAGE_CHOICES)}")
    return kind


@dataclass
class _Mapped:
    path: str
    file: object
    map: mmap.mmap
    tensor: torch.Tensor


class ActivationStore:
    """Allocates, reads and writes the activation buffers of one run.

    ``kind``: ``device``, ``cpu`` or ``disk``; ``device``: the compute device; ``folder``: where
    disk buffers go (a fresh temporary folder inside it, removed by :meth:`close`; default: the
    system temporary folder).
    """

    def __init__(self, kind: str, device, folder: Optional[str] = None):
        self.kind = check_storage(kind)
        self.device = torch.device(device)
        self.place = self.device if kind == "device" else torch.device("cpu")
        self._folder_arg = folder
        self._folder = None
        self._maps = []  # the (at most two) disk buffers, reused in turn
        self._count = 0

    # -- allocation -------------------------------------------------------------------------
    def capture(self, model, tokens: torch.Tensor, batch_size: int):
        """Inputs of decoder layer 0 in this store, and the per-batch-size keyword arguments."""
        if self.kind != "disk":
            return capture_layer0_inputs(model, tokens, self.device, batch_size, self.place)
        # Capture a few batches at a time into RAM and move them to the file, so the whole
        # activation tensor is never resident.
        out, kwargs = None, {}
        start, nsamples = 0, tokens.shape[0]
        chunk = batch_size
        while start < nsamples:
            part, part_kwargs = capture_layer0_inputs(model, tokens[start:start + chunk], self.device,
                                                      batch_size, torch.device("cpu"))
            if out is None:
                out = self._new_mapped((nsamples,) + tuple(part.shape[1:]), part.dtype)
                per_sample = part[0].numel() * part.element_size()
                chunk = max(1, _CAPTURE_CHUNK_BYTES // (per_sample * batch_size)) * batch_size
            self.put(out, start, part)
            for bsz, kw in part_kwargs.items():
                kwargs.setdefault(bsz, kw)
            start += part.shape[0]
        return out, kwargs

    def adopt(self, tensor: torch.Tensor) -> torch.Tensor:
        """A buffer of this store holding ``tensor`` (activations restored by ``--resume``)."""
        if self.kind != "disk":
            return tensor.to(self.place)
        out = self._new_mapped(tuple(tensor.shape), tensor.dtype)
        self.put(out, 0, tensor)
        return out

    def empty_like(self, buffer: torch.Tensor) -> torch.Tensor:
        """An output buffer of the same shape and dtype as ``buffer`` (never ``buffer`` itself)."""
        if self.kind != "disk":
            return torch.empty_like(buffer)
        for m in self._maps:  # reuse the file that does not hold ``buffer``
            if not _same_memory(m.tensor, buffer) and m.tensor.shape == buffer.shape \
                    and m.tensor.dtype == buffer.dtype:
                return m.tensor
        return self._new_mapped(tuple(buffer.shape), buffer.dtype, keep=buffer)

    # -- access -----------------------------------------------------------------------------
    def batch(self, buffer: torch.Tensor, start: int, size: int, device) -> torch.Tensor:
        """Samples ``start:start+size`` of ``buffer`` on ``device``."""
        view = buffer[start:start + size]
        if self.kind != "disk":
            return view.to(device)
        out = view.to(device, copy=True)  # a private copy, so the mapped pages can be dropped
        self._drop(buffer, start, view.shape[0])
        return out

    def put(self, buffer: torch.Tensor, start: int, values: torch.Tensor):
        """Write ``values`` into samples ``start:start+len(values)`` of ``buffer``."""
        buffer[start:start + values.shape[0]] = values.to(buffer.device)
        if self.kind == "disk":
            self._drop(buffer, start, values.shape[0])

    def release(self, buffer: Optional[torch.Tensor]):
        """Drop every resident page of a disk buffer (after something read it whole)."""
        if self.kind == "disk" and buffer is not None and buffer.numel():
            self._drop(buffer, 0, buffer.shape[0])

    def close(self):
        """Unmap and delete the disk buffers."""
        maps, self._maps = self._maps, []
        for m in maps:
            _unmap(m)
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None

    def describe(self) -> dict:
        out = {"storage": self.kind, "place": str(self.place)}
        if self.kind == "disk":
            out["folder"] = self._folder or self._folder_arg or tempfile.gettempdir()
        return out

    # -- disk buffers -----------------------------------------------------------------------
    def _new_mapped(self, shape, dtype, keep=None) -> torch.Tensor:
        # Only a layer's inputs and outputs are alive at once: keep at most one other file,
        # never the one holding ``keep``.
        for old in [m for m in self._maps if not _same_memory(m.tensor, keep)]:
            if len(self._maps) < 2:
                break
            self._maps.remove(old)
            _unmap(old)
        if self._folder is None:
            base = self._folder_arg or tempfile.gettempdir()
            os.makedirs(base, exist_ok=True)
            self._folder = tempfile.mkdtemp(prefix="pyprune-activations-", dir=base)
            # Removed even when the run stops with an exception (or at interpreter exit).
            weakref.finalize(self, shutil.rmtree, self._folder, True)
        numel = 1
        for s in shape:
            numel *= int(s)
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        self._count += 1
        path = os.path.join(self._folder, f"buffer{self._count}.bin")
        f = open(path, "w+b")
        f.truncate(max(nbytes, 1))
        mm = mmap.mmap(f.fileno(), max(nbytes, 1))
        tensor = torch.frombuffer(mm, dtype=torch.uint8, count=nbytes).view(dtype).view(shape)
        self._maps.append(_Mapped(path, f, mm, tensor))
        return tensor

    def _drop(self, buffer, start, count):
        """``madvise(DONTNEED)`` on the pages of samples ``start:start+count`` of ``buffer``:
        they leave the process (the data stays in the file / page cache)."""
        for m in self._maps:
            if _same_memory(m.tensor, buffer):
                per_sample = buffer[0].numel() * buffer.element_size()
                lo = start * per_sample
                hi = (start + count) * per_sample
                lo -= lo % mmap.PAGESIZE  # madvise needs a page-aligned start
                m.map.madvise(mmap.MADV_DONTNEED, lo, min(hi, len(m.map)) - lo)
                return


def _unmap(m: _Mapped):
    m.tensor = None
    try:
        m.map.close()
    except BufferError:  # a tensor still views it; the pages are unmapped when that tensor dies
        pass
    m.file.close()
    try:
        os.unlink(m.path)
    except FileNotFoundError:
        pass


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is not None and b is not None and a.data_ptr() == b.data_ptr() and a.device == b.device


# -- memory estimate ----------------------------------------------------------------------------

def _gib(nbytes: float) -> str:
    if nbytes >= 1 << 30:
        return f"{nbytes / (1 << 30):.2f} GiB"
    return f"{nbytes / (1 << 20):.1f} MiB"


def estimate_activation_memory(nsamples: int, seqlen: int, hidden: int, dtype, batch_size: int = 1,
                               statistics_bytes: int = 0) -> dict:
    """Bytes each storage choice needs for calibration activations.

    Two copies (a layer's inputs and outputs) exist while a layer runs; a batch in flight is
    ``batch_size`` samples. ``statistics_bytes``: the float32 statistics of one decoder layer
    (one ``in x in`` Hessian per Linear), on the compute device whatever the choice.
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    per_sample = seqlen * hidden * itemsize
    copy = nsamples * per_sample
    batch = 2 * min(batch_size, nsamples) * per_sample  # one batch read + its output
    return {
        "per_copy_bytes": copy,
        "statistics_bytes": statistics_bytes,
        "device": {"device_bytes": 2 * copy, "ram_bytes": 0, "disk_bytes": 0},
        "cpu": {"device_bytes": batch, "ram_bytes": 2 * copy, "disk_bytes": 0},
        "disk": {"device_bytes": batch, "ram_bytes": batch, "disk_bytes": 2 * copy},
    }


def estimate_for_run(model, tokens: torch.Tensor, batch_size: int):
    """``(estimate, (nsamples, seqlen, hidden), dtype)`` for pruning ``model`` on ``tokens``
    (works on a skeleton whose parameters are on ``meta``)."""
    from pyprune.models.families import decoder_layers, prunable_linears, weight_matrix

    first = decoder_layers(model)[0]
    linears = prunable_linears(first)
    hidden = weight_matrix(linears[0][1]).shape[1]
    dtype = next((p.dtype for p in first.parameters() if p.is_floating_point()), torch.float32)
    shape = (int(tokens.shape[0]), int(tokens.shape[1]), int(hidden))
    stats = max(layer_statistics_bytes(layer) for layer in decoder_layers(model))
    return estimate_activation_memory(*shape, dtype, batch_size, stats), shape, dtype


def layer_statistics_bytes(layer) -> int:
    """Float32 Hessian bytes of all Linears of one decoder layer (they coexist while it runs)."""
    from pyprune.models.families import prunable_linears, weight_matrix

    return sum(4 * weight_matrix(m).shape[1] ** 2 for _, m in prunable_linears(layer))


def format_estimate(estimate: dict, chosen: str, device, shape, dtype) -> str:
    """Lines to print before a run: the memory each choice needs, and the choice made."""
    device = torch.device(device)
    n, s, h = shape
    lines = [f"calibration activations: {n} x {s} x {h} {str(dtype).replace('torch.', '')} = "
             f"{_gib(estimate['per_copy_bytes'])} per copy, 2 copies while a layer runs"]
    for kind in STORAGE_CHOICES:
        e = estimate[kind]
        where = []
        if device.type != "cpu" and e["device_bytes"]:
            where.append(f"{_gib(e['device_bytes'])} on {device}")
        ram = e["ram_bytes"] + (e["device_bytes"] if device.type == "cpu" else 0)
        where.append(f"{_gib(ram)} CPU RAM")
        if e["disk_bytes"]:
            where.append(f"{_gib(e['disk_bytes'])} on disk")
        mark = "  <- chosen" if kind == chosen else ""
        lines.append(f"  --activations {kind:<6}: " + ", ".join(where) + mark)
    if estimate["statistics_bytes"]:
        lines.append(f"  per-layer statistics (float32 Hessians): {_gib(estimate['statistics_bytes'])} on {device}")
    return "\n".join(lines)
