"""Save and load calibration token tensors, so one calibration set can be reused across runs.

Format: a safetensors file holding one int64 tensor ``input_ids`` of shape ``[nsamples, seqlen]``
(the form every calibration source returns) and, in the safetensors header, a JSON description
of how it was made (source, model, seed, sampling parameters, generation seconds...) under the
key ``pyprune.calibration``, plus the SHA-256 of the token bytes so a damaged file is detected
instead of silently calibrating on wrong tokens. A plain safetensors file with an ``input_ids``
tensor from another tool also loads (with ``{"source": "file"}`` as its metadata).
"""
import hashlib
import json
import os
from pathlib import Path
from typing import Optional, Tuple, Union

import torch

TENSOR_KEY = "input_ids"
METADATA_KEY = "pyprune.calibration"
CHECKSUM_KEY = "pyprune.sha256"
FORMAT_VERSION = 1

PathLike = Union[str, os.PathLike]


class CalibrationFileError(ValueError):
    """A calibration file exists but cannot be used (corrupt, wrong contents or wrong shape)."""


def _sha256(tokens: torch.Tensor) -> str:
    return hashlib.sha256(tokens.contiguous().numpy().tobytes()).hexdigest()


def _check_tokens(tokens, what: str) -> torch.Tensor:
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor of token ids, got {type(tokens).__name__}")
    if tokens.dim() != 2 or tokens.shape[0] < 1 or tokens.shape[1] < 1:
        raise ValueError(f"{what} must have shape [nsamples, seqlen] with both >= 1, "
                         f"got {tuple(tokens.shape)}")
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise ValueError(f"{what} must hold integer token ids, got dtype {tokens.dtype}")
    if int(tokens.min()) < 0:
        raise ValueError(f"{what} holds a negative token id ({int(tokens.min())})")
    return tokens.detach().to("cpu", torch.long).contiguous()


def save_calibration(path: PathLike, tokens: torch.Tensor, metadata: Optional[dict] = None) -> Path:
    """Write ``tokens`` (``[nsamples, seqlen]`` token ids) and ``metadata`` to ``path``.

    ``metadata`` must be JSON-serializable (e.g. the ``info`` of ``generate_calibration``). The
    file is written next to its destination and renamed into place, so an interrupted save never
    leaves a half-written calibration file behind.
    """
    from safetensors.torch import save_file

    path = Path(path)
    tokens = _check_tokens(tokens, "calibration tokens")
    meta = dict(metadata or {})
    meta.setdefault("nsamples", int(tokens.shape[0]))
    meta.setdefault("seqlen", int(tokens.shape[1]))
    meta["format_version"] = FORMAT_VERSION
    try:
        meta_json = json.dumps(meta, sort_keys=True)
    except (TypeError, ValueError) as err:
        raise ValueError(f"calibration metadata must be JSON-serializable: {err}") from err
    header = {"format": "pt", METADATA_KEY: meta_json, CHECKSUM_KEY: _sha256(tokens)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({TENSOR_KEY: tokens}, str(tmp), metadata=header)
    os.replace(tmp, path)
    return path


def load_calibration(path: PathLike, *, nsamples: Optional[int] = None,
                     seqlen: Optional[int] = None,
                     vocab_size: Optional[int] = None) -> Tuple[torch.Tensor, dict]:
    """Read a calibration file; returns ``(tokens LongTensor [nsamples, seqlen], metadata)``.

    ``nsamples``/``seqlen``/``vocab_size``, when given, are checked against the file so that a
    file made for another run or another model fails here, before any expensive work.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"calibration file {path} does not exist")
    if not path.is_file():
        raise CalibrationFileError(f"calibration file {path} is not a regular file")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = f.metadata() or {}
            keys = list(f.keys())
            if TENSOR_KEY not in keys:
                raise CalibrationFileError(
                    f"calibration file {path} has no '{TENSOR_KEY}' tensor (found {keys})")
            tokens = f.get_tensor(TENSOR_KEY)
    except CalibrationFileError:
        raise
    except Exception as err:  # safetensors raises its own error type for damaged headers/data
        raise CalibrationFileError(
            f"calibration file {path} is not a readable safetensors file: {err}") from err

    if tokens.dim() != 2 or tokens.dtype != torch.long:
        raise CalibrationFileError(f"calibration file {path}: '{TENSOR_KEY}' must be an int64 "
                                   f"[nsamples, seqlen] tensor, got {tokens.dtype} "
                                   f"{tuple(tokens.shape)}")
    if METADATA_KEY in header:
        try:
            metadata = json.loads(header[METADATA_KEY])
        except json.JSONDecodeError as err:
            raise CalibrationFileError(
                f"calibration file {path}: its metadata is not valid JSON ({err})") from err
        expected = header.get(CHECKSUM_KEY)
        if expected is None or _sha256(tokens) != expected:
            raise CalibrationFileError(f"calibration file {path} is corrupt: its token data does "
                                       "not match the checksum written when it was saved")
    else:
        metadata = {"source": "file"}

    n, L = tokens.shape
    if nsamples is not None and n != nsamples:
        raise CalibrationFileError(f"calibration file {path} holds {n} samples, but nsamples="
                                   f"{nsamples} was asked for")
    if seqlen is not None and L != seqlen:
        raise CalibrationFileError(f"calibration file {path} holds sequences of {L} tokens, but "
                                   f"seqlen={seqlen} was asked for")
    if vocab_size is not None:
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= vocab_size:
            raise CalibrationFileError(
                f"calibration file {path} holds token ids in [{lo}, {hi}], outside this model's "
                f"vocabulary [0, {vocab_size}): it was made with another tokenizer")
    return tokens, metadata
