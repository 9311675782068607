"""2:4 matmul on the GPU's sparse tensor cores through cuSPARSELt: the ``"cusparselt"`` variant.

At prefill the multiply is compute-bound, and only the sparse tensor cores turn the pruned half of
a 2:4 weight into fewer multiply-adds. cuSPARSELt multiplies a compressed 2:4 matrix held in one
buffer: the kept values ``[N, K/2]`` in row order (exactly ``values`` of
``pyprune.formats.sparse24``), then its own metadata, whose layout is the library's.

pyprune keeps its own layout (the one its Triton kernels read) and derives the library's metadata
once per weight: a probe matrix with the weight's pattern and nonzero kept values (neighbours
distinct) is compressed, the kept values at the front of the result are checked against the
probe (so a library that stored them otherwise is refused, not misread), and the tail after them
is cached for the weight's ``meta`` tensor (about 1 bit per weight, freed with the tensor;
recomputed if ``meta`` is modified in place). Each call then assembles the buffer: the kept
values (copied for 2:4, dequantized from the codes for 2:4 + INT4), then the cached metadata.
Kept values equal to zero are harmless: the probe's are never zero, so the metadata always names
the weight's own positions. cuSPARSELt's algorithm is searched once per shape and power-of-two
bucket of M.
"""
import torch

from .tensor_keyed import TensorKeyed

VARIANT = "cusparselt"
_ALIGN_M = 8  # rows of x are padded to a multiple of this (cuSPARSELt's 16-byte alignment)
_ALIGN_NK = 16  # N and K: the smallest sparse tile of 16-bit types
_PROBE_PERIOD = 256  # probe values 1..256: exact integers in fp16 and in bf16 (8 significant bits)
_METADATA = TensorKeyed()  # meta -> ((in-place version, dtype, N, K), its library metadata)


def library_available() -> bool:
    return torch.cuda.is_available() and torch.backends.cusparselt.is_available()


def unsupported_reason(n: int, k: int, dtype: torch.dtype, device) -> str:
    """Why this variant cannot run for an ``[N, K]`` weight and activations of ``dtype`` on
    ``device`` ("" if it can)."""
    if torch.device(device).type != "cuda":
        return f"cuSPARSELt needs a CUDA device, got {device}"
    if not library_available():
        return "cuSPARSELt is not available in this torch build"
    if torch.cuda.get_device_capability(device) < (8, 0):
        return "sparse tensor cores need compute capability 8.0 or newer"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"cuSPARSELt here takes float16 or bfloat16 activations, got {dtype}"
    if n % _ALIGN_NK or k % _ALIGN_NK:
        return f"cuSPARSELt needs N and K multiples of {_ALIGN_NK}, got N={n}, K={k}"
    return ""


def _compress(dense: torch.Tensor) -> torch.Tensor:
    return torch._cslt_compress(dense)


def _multiply(buffer: torch.Tensor, x: torch.Tensor, bias, algorithm: int) -> torch.Tensor:
    """``x [M, K] @ W^T`` for the compressed W in ``buffer``: W times x^T (a transposed view, no
    copy), the result stored transposed, i.e. ``[M, N]`` row-major."""
    return torch._cslt_sparse_mm(buffer, x.t(), bias=bias, transpose_result=True, alg_id=algorithm)


def _search(buffer: torch.Tensor, x: torch.Tensor, bias) -> int:
    """The fastest of cuSPARSELt's algorithms for this product (it runs each of them)."""
    return int(torch._cslt_sparse_mm_search(buffer, x.t(), bias=bias, transpose_result=True))


_ALGORITHMS = {}  # (N, K, bucket of M, dtype, device) -> cuSPARSELt algorithm id


def algorithm_for(buffer, x, bias, n: int, k: int) -> int:
    """cuSPARSELt's algorithm for this shape: searched once per shape and power-of-two bucket of M
    (its default, 0, where the search fails, and while a CUDA graph is being captured)."""
    key = (n, k, 1 << max(0, x.shape[0] - 1).bit_length(), x.dtype, x.device)
    if key not in _ALGORITHMS:
        if x.is_cuda and torch.cuda.is_current_stream_capturing():
            return 0
        try:
            _ALGORITHMS[key] = _search(buffer, x, bias)
        except Exception:  # noqa: BLE001 - a library without the search: its default algorithm
            _ALGORITHMS[key] = 0
    return _ALGORITHMS[key]


def _probe_values(n: int, k: int, dtype, device) -> torch.Tensor:
    """Nonzero kept values ``[N, K/2]`` with distinct neighbours (1..256, repeating), so that a
    misplaced value shows."""
    j = torch.arange(k // 2, device=device)
    rows = torch.arange(n, device=device)[:, None]
    return ((j[None, :] + rows) % _PROBE_PERIOD + 1).to(dtype)


def _library_metadata(meta: torch.Tensor, n: int, k: int, dtype, to_dense) -> tuple:
    """(shape of the compressed buffer, the library's metadata: the buffer after the kept values)."""
    probe = _probe_values(n, k, dtype, meta.device)
    compressed = _compress(to_dense(probe, meta))
    flat = compressed.reshape(-1)
    kept = n * k // 2
    if flat.numel() <= kept or not torch.equal(flat[:kept].view(n, k // 2), probe):
        raise RuntimeError(
            "cuSPARSELt's compressed buffer does not start with the kept values in row order; "
            "the cusparselt variant cannot share pyprune's 2:4 layout with this library version"
        )
    return tuple(compressed.shape), flat[kept:].view(torch.int16).clone()  # bits, not numbers


def _version(t: torch.Tensor):
    try:
        return t._version
    except RuntimeError:  # an inference tensor: no version counter
        return None


def cached_metadata(meta: torch.Tensor, n: int, k: int, dtype, to_dense) -> tuple:
    """``_library_metadata``, computed once per ``meta`` tensor, dtype and in-place version."""
    key = (_version(meta), dtype, n, k)
    cached = _METADATA.value(meta)
    if cached is None or cached[0] != key:
        cached = _METADATA.keep(meta, (key, _library_metadata(meta, n, k, dtype, to_dense)))
    return cached[1]


def sparse_matmul(x2, meta, n: int, k: int, fill_kept, to_dense, bias=None):
    """``y = x2 @ W^T`` on the sparse tensor cores, ``x2 [M, K]`` fp16/bf16.

    ``fill_kept(out)`` writes the weight's kept values into ``out [N, K/2]`` (x2's dtype);
    ``to_dense(values, meta)`` expands kept values with this pattern (for the probe).
    """
    reason = unsupported_reason(n, k, x2.dtype, x2.device)
    if reason:
        raise ValueError(f"the {VARIANT} variant cannot run: {reason}")
    shape, library_meta = cached_metadata(meta, n, k, x2.dtype, to_dense)
    buffer = torch.empty(shape, dtype=x2.dtype, device=x2.device)
    flat = buffer.view(-1)
    kept = n * k // 2
    fill_kept(flat[:kept].view(n, k // 2))
    flat[kept:].view(torch.int16).copy_(library_meta)
    m = x2.shape[0]
    pad = -m % _ALIGN_M
    # The library takes x's row stride to be K: rows of a wider tensor are copied.
    xp = torch.nn.functional.pad(x2, (0, 0, 0, pad)) if pad else x2.contiguous()
    if bias is not None:
        bias = bias.to(x2.dtype)
    y = _multiply(buffer, xp, bias, algorithm_for(buffer, xp, bias, n, k))
    return y[:m] if pad else y
