"""Model-level compression: swap every eligible Linear of the decoder layers for its packed
drop-in module (``pyprune.nn``), and report what was swapped, what was skipped and why.

``compress(model, "2:4" | "int4" | "2:4-int4")`` works in place on a (pruned and/or quantized)
Hugging Face causal LM. Embeddings, norms and ``lm_head`` stay dense. A Linear that does not fit
the format (not 2:4 sparse, width not a multiple of 32, group size not dividing the width,
GPT-2 Conv1D) is left dense and listed in the report with the reason.
"""
from dataclasses import asdict, dataclass, field
from typing import List, Mapping, Optional

import torch
import torch.nn as nn

from pyprune.formats import canonical_format
from pyprune.models.families import Conv1D, find_layer_list_path, prunable_linears
from pyprune.nn import MODULES, CompressedLinear


@dataclass
class ModuleReport:
    name: str
    shape: tuple  # (out_features, in_features)
    status: str  # "compressed" or "skipped"
    reason: str = ""  # why skipped
    source: str = ""  # "quant_state" (codes taken exactly), "rtn" (quantized here) or "weight"
    bits_per_weight: float = 16.0
    fp16_bytes: int = 0
    packed_bytes: int = 0


@dataclass
class CompressReport:
    format: str
    groupsize: Optional[int]
    modules: List[ModuleReport] = field(default_factory=list)

    @property
    def compressed(self) -> List[ModuleReport]:
        return [m for m in self.modules if m.status == "compressed"]

    @property
    def skipped(self) -> List[ModuleReport]:
        return [m for m in self.modules if m.status == "skipped"]

    def totals(self) -> dict:
        fp16 = sum(m.fp16_bytes for m in self.compressed)
        packed = sum(m.packed_bytes for m in self.compressed)
        return {
            "linears": len(self.modules),
            "compressed": len(self.compressed),
            "skipped": len(self.skipped),
            "compressed_fp16_bytes": fp16,
            "compressed_packed_bytes": packed,
            "ratio_vs_fp16": (fp16 / packed) if packed else None,
            "bits_per_weight": (8.0 * packed / (fp16 / 2)) if fp16 else None,
        }

    def to_dict(self) -> dict:
        return {
            "format": self.format,
            "groupsize": self.groupsize,
            "totals": self.totals(),
            "modules": [asdict(m) for m in self.modules],
        }

    def __str__(self) -> str:
        t = self.totals()
        lines = [f"compress {self.format}: {t['compressed']}/{t['linears']} Linears packed"]
        if t["compressed"]:
            lines[0] += (f", {t['compressed_fp16_bytes'] / 2**20:.2f} MiB fp16 -> "
                         f"{t['compressed_packed_bytes'] / 2**20:.2f} MiB ({t['bits_per_weight']:.3f} bits/weight)")
        for m in self.skipped:
            lines.append(f"  skipped {m.name} {tuple(m.shape)}: {m.reason}")
        return "\n".join(lines)


def _swap(model: nn.Module, name: str, new: nn.Module):
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _build(fmt: str, module: nn.Linear, groupsize: int, state, value_dtype):
    cls = MODULES[fmt]
    if fmt == "2:4":
        return cls.from_linear(module, dtype=value_dtype), "weight"
    if state is not None:
        return cls.from_linear(module, quant_state=state), "quant_state"
    return cls.from_linear(module, groupsize=groupsize), "rtn"


def compress(
    model: nn.Module,
    format: str,
    *,
    groupsize: int = 128,
    quant_state: Optional[Mapping[str, object]] = None,
    value_dtype: Optional[torch.dtype] = None,
    strict: bool = False,
) -> CompressReport:
    """Swap the Linears of the decoder layers of ``model`` (in place) for packed modules.

    * ``format``: ``"2:4"``, ``"int4"`` or ``"2:4-int4"``.
    * ``groupsize``: INT4 group size for layers quantized here by round-to-nearest (layers found
      in ``quant_state`` keep their own).
    * ``quant_state``: full module name -> object with ``qweight`` (int codes ``[out, in]``),
      ``scales`` (``[out, in/G]``) and ``groupsize``, e.g. ``load_quant_state(saved_dir)`` of
      ``pyprune.formats.quant_state``: the codes are taken exactly (they must reproduce the
      model's weight).
    * ``value_dtype``: 2:4 value dtype (default: the weight's when fp16/bf16, else fp16).
    * ``strict``: raise instead of skipping a Linear that does not fit.
    """
    fmt = canonical_format(format)
    quant_state = dict(quant_state or {})
    report = CompressReport(format=fmt, groupsize=None if fmt == "2:4" else groupsize)
    path = find_layer_list_path(model)
    layers = model.get_submodule(path)
    for i, layer in enumerate(layers):
        for sub, module in prunable_linears(layer):
            name = f"{path}.{i}.{sub}"
            if isinstance(module, CompressedLinear):
                continue
            is_conv1d = bool(Conv1D) and isinstance(module, Conv1D)
            shape = tuple(module.weight.shape[::-1]) if is_conv1d else tuple(module.weight.shape)
            entry = ModuleReport(name=name, shape=shape, status="skipped", fp16_bytes=2 * shape[0] * shape[1])
            report.modules.append(entry)
            if is_conv1d:
                entry.reason = "Conv1D (GPT-2 style, weight stored [in, out]) is not supported by the packed modules"
            else:
                try:
                    new, entry.source = _build(fmt, module, groupsize, quant_state.get(name), value_dtype)
                except (ValueError, TypeError) as exc:  # PatternError is a ValueError
                    entry.reason = str(exc)
                else:
                    _swap(model, name, new.to(module.weight.device))
                    entry.status = "compressed"
                    entry.bits_per_weight = new.bits_per_weight
                    entry.packed_bytes = new.packed().nbytes
            if entry.status == "skipped" and strict:
                raise ValueError(f"cannot compress {name} to {fmt}: {entry.reason}")
    unused = set(quant_state) - {m.name for m in report.modules}
    if unused:
        raise ValueError(f"quant_state names modules that are not Linears of the decoder layers: {sorted(unused)[:5]}")
    return report
