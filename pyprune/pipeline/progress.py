"""Per-layer progress on disk, so a killed run resumes where it stopped.

After layer ``k`` is pruned, the folder holds ``layer_{k}.safetensors`` (its pruned Linear
weights), ``records.json`` (report entries so far), ``inputs.pt`` (the inputs of layer ``k+1``)
and ``state.json`` (next layer, fingerprint of the configuration). Files are written to a
temporary name and renamed, so a kill mid-write leaves the previous state intact. Resuming with a
different configuration is refused.
"""
import json
import os

import torch
from safetensors.torch import load_file, save_file


class ProgressStore:
    def __init__(self, folder: str, fingerprint: dict):
        self.folder = folder
        self.fingerprint = fingerprint
        os.makedirs(folder, exist_ok=True)

    def _path(self, name):
        return os.path.join(self.folder, name)

    def _atomic(self, name, write):
        tmp = self._path(name + ".tmp")
        write(tmp)
        os.replace(tmp, self._path(name))

    def save_layer(self, index: int, weights: dict, records: list, next_inputs: torch.Tensor, extra=None):
        self._atomic(f"layer_{index:04d}.safetensors",
                     lambda p: save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, p))
        self._atomic("inputs.pt", lambda p: torch.save(next_inputs.detach().cpu(), p))
        self._atomic("records.json", lambda p: _write_json(p, records))
        state = {"next_layer": index + 1, "fingerprint": self.fingerprint, "extra": extra or {}}
        self._atomic("state.json", lambda p: _write_json(p, state))

    def load(self):
        """``(next_layer, records, inputs, extra, weights_by_layer)`` or None when nothing is saved."""
        state_path = self._path("state.json")
        if not os.path.isfile(state_path):
            return None
        with open(state_path) as f:
            state = json.load(f)
        if state.get("fingerprint") != self.fingerprint:
            raise ValueError(
                f"cannot resume from {self.folder}: it was written by a run with a different configuration "
                f"({_diff(state.get('fingerprint') or {}, self.fingerprint)}); use another --progress-dir"
            )
        with open(self._path("records.json")) as f:
            records = json.load(f)
        inputs = torch.load(self._path("inputs.pt"), weights_only=True)
        weights = {}
        for k in range(state["next_layer"]):
            path = self._path(f"layer_{k:04d}.safetensors")
            if not os.path.isfile(path):
                raise FileNotFoundError(f"progress folder {self.folder} lacks {path}; cannot resume")
            weights[k] = load_file(path)
        return state["next_layer"], records, inputs, state.get("extra", {}), weights


def _write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)


def _diff(old, new):
    keys = sorted(set(old) | set(new))
    changed = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]
    return "; ".join(changed) or "unknown difference"
