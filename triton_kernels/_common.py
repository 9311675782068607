"""Shared pieces of the packed-weight matmul kernels: launch configurations, the tile order,
the split-K epilogue and reduction, and a small per-shape tuner.

Every kernel computes ``y = x @ W^T`` (``x [M, K]`` fp16/bf16, packed ``W [N, K]``), decoding the
weight tile in registers and accumulating in fp32. Two paths:

* decode (``M <= 16``): one 16-row tile covers all of ``x``, so each packed weight byte is read
  exactly once; the K loop is split across ``split_k`` programs (GEMV style) so that enough
  programs stream the weight, and a second tiny kernel sums the fp32 partials, or (a tuner
  choice, ``KernelConfig.reduce_in_kernel``) the last program of each output tile to finish does
  (``store_result``): one launch per product instead of two.
* prefill (large ``M``): 2-D tiles in grouped order for L2 reuse.

Variants (``KernelConfig.variant``):

* ``"rows"`` (the default, except gemv at M <= 2): the packed ``[BLOCK_N, BLOCK_K / fields]`` tile is loaded as
  contiguous runs along K (vector loads, each word read once), decoded in registers into the
  dense ``[BLOCK_N, BLOCK_K]`` tile (joins keep each word's values in the thread that loaded it),
  and one ``tl.dot`` takes it transposed. Needs ``BLOCK_K >= 64``. For INT4 formats with fp16
  activations the tuner also tries it with the group scales folded into the tile
  (``KernelConfig.fold_scales``), and every format with the weight as the dot's left operand
  (``KernelConfig.weight_left``: ``y^T = W x^T``, see ``dot_rows``).
* ``"split"`` (decode): the compact packed tile is loaded once and multiplied field by field
  (one ``tl.dot`` per 4-bit field, or per position in the group of 4, against the matching
  strided columns of x, which is tiny and cached).
* ``"gemv"`` (decode; the default at M <= 2, a tuner candidate up to ``KernelLimits.gemv_max_m``):
  no tensor cores, no padding of M to 16; each program streams ``[BLOCK_N, BLOCK_K]`` of the
  packed weight along K (contiguous per row; a tile may span several quantization groups),
  decodes it once in fp32 (4-bit codes through the float mantissa, no int-to-float conversion),
  fetches the matching entries of x (tiny, cached) and reduces over K for every row of x.
* ``"tile"``: the dense ``[BLOCK_K, BLOCK_N]`` tile of W^T is rebuilt in registers, each packed
  word fetched by every lane that needs one of its fields. Slower than ``rows`` on an H100 but it
  takes any ``BLOCK_K``: the kernel for groups of 32.
* ``"dense"`` (prefill; fp16, and bf16 for 2:4 values stored in bf16): decode the weight with a
  Triton kernel and multiply with cuBLAS (bias in the GEMM), the fastest at very large M.
* ``"dense_chunks"`` (where ``"dense"`` is offered): the same, ``BLOCK_N`` rows of the weight at a
  time through one reused buffer (``dense_matmul``): a temporary of ``BLOCK_N x K``
  instead of ``N x K``, which can stay in L2 between the decode and cuBLAS.
* ``"cusparselt"`` (prefill, the 2:4 formats, where ``"dense"`` is offered): assemble the kept
  values and cuSPARSELt's metadata and multiply on the sparse tensor cores
  (``sparse_tensor_cores``).

On a GPU the first call for a shape times a few candidate configurations (in a CUDA graph, see
``graph_time_ms``) and keeps the fastest; ``PYPRUNE_TRITON_TUNE=0`` skips that and uses the
heuristic default, ``PYPRUNE_TRITON_TUNE=verbose`` prints every candidate's time. Under
``TRITON_INTERPRET=1`` one fixed small configuration is used and tile operands are upcast to fp32
before ``tl.dot`` (the interpreter's bf16 dot is wrong).
"""
import os
import threading
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from . import sparse_tensor_cores, tile_counters

DECODE_MAX_M = 16
GEMV_MAX_M = 4  # up to here the long-tile gemv candidates; above, shorter tiles (see candidate_configs)
GEMV_MIN_BLOCK_K = 32  # smallest BLOCK_K of the "gemv" variant (for every format; not bounded by G)
ROWS_MIN_BLOCK_K = 64  # the "rows" variant unpacks whole 2:4 metadata words (32 columns) per row
VARIANTS = ("tile", "split", "gemv", "rows", "dense", "dense_chunks", sparse_tensor_cores.VARIANT)
DENSE_VARIANTS = ("dense", "dense_chunks")  # expand, then cuBLAS (dense_matmul)
WHOLE_WEIGHT_VARIANTS = DENSE_VARIANTS + (sparse_tensor_cores.VARIANT,)  # no Triton tile
TUNE_ENV = "PYPRUNE_TRITON_TUNE"
ACTIVATION_DTYPES = (torch.float16, torch.bfloat16)


# Read once, as Triton does when it decorates the kernels: they were built interpreted or compiled
# at import, whatever the variable says later (and a launch then reads no environment).
_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def interpreting() -> bool:
    return _INTERPRETING


@dataclass(frozen=True)
class KernelConfig:
    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3
    variant: str = "tile"  # one of VARIANTS (see the module docstring)
    fold_scales: bool = False  # "rows" of an INT4 format, fp16 only: see scaled_dot_rows
    weight_left: bool = False  # "rows": the decoded weight is the dot's left operand, see dot_rows
    reduce_in_kernel: bool = False  # split_k > 1: the partials summed in the kernel, see store_result


def cdiv(a: int, b: int) -> int:
    """Ceiling division on the host. ``triton.cdiv`` is a constexpr function for kernels, whose
    Python call costs microseconds: a launch computes several of these."""
    return -(-a // b)


def next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def m_bucket(m: int) -> int:
    """Shapes are tuned per power-of-two bucket of M (capped at 4096)."""
    return min(next_pow2(m), 4096)


def pow2_divisor(n: int, cap: int) -> int:
    """Largest power of two <= cap that divides n."""
    b = cap
    while b > 1 and n % b:
        b //= 2
    return b


def _num_sms(device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 8


def choose_split_k(n_tiles_mn: int, k_tiles: int, device, waves: int = 2) -> int:
    """Enough programs to fill the GPU about ``waves`` times, never more splits than K tiles."""
    target = waves * _num_sms(device)
    split = 1
    while split * 2 <= k_tiles and n_tiles_mn * split * 2 <= target:
        split *= 2
    return split


@dataclass(frozen=True)
class KernelLimits:
    """What a format's kernels accept: ``block_k_max`` (BLOCK_K must divide the group size, a
    power of two <= 256), ``split_block_k`` (smallest BLOCK_K of the "split" variant: 16
    rows per field dot, i.e. 128 for INT4's 8 fields, 64 for the 4 positions of 2:4) and
    ``scaled`` (group scales, which the "rows" variant can fold into the fp16 tile) and
    ``sparse24`` (a 2:4 pattern: the "cusparselt" variant applies)."""

    block_k_max: int
    split_block_k: int
    scaled: bool = False  # the format has group scales (INT4 formats)
    sparse24: bool = False  # the format is 2:4 sparse (2:4, 2:4 + INT4)
    # The "gemv" variant's tuning candidates: row tiles, K tiles (the first pair is the default at
    # M <= 2) and the largest M offered. Narrow row tiles with long K runs stream best for the 2:4
    # format (measured on an H100); the INT4 formats' kernels share each column of x among the
    # rows a thread holds, so they need wide row tiles (see each format's limits).
    gemv_block_n: tuple = (16, 8, 4)
    gemv_block_k: tuple = (1024, 512, 2048)
    gemv_max_m: int = DECODE_MAX_M

    @property
    def split_ok(self) -> bool:
        return self.block_k_max >= self.split_block_k


def _decode_config(N, K, bk, bn, variant, device, num_stages=3) -> KernelConfig:
    split = choose_split_k(cdiv(N, bn), cdiv(K, bk), device)
    return KernelConfig(16, bn, bk, split_k=split, num_warps=4, num_stages=num_stages, variant=variant)


def _gemv_config(M, N, K, bk, bn, device, num_warps=4, num_stages=3, waves=8) -> KernelConfig:
    # Many small programs keep enough loads in flight to stream the weight at full bandwidth; with
    # few waves (no split when the rows alone fill the GPU) the split-K reduction launch is saved.
    split = choose_split_k(cdiv(N, bn), cdiv(K, bk), device, waves=waves)
    return KernelConfig(next_pow2(M), bn, bk, split_k=split, num_warps=num_warps, num_stages=num_stages,
                        variant="gemv")


def _unpacking_variant(block_k: int) -> str:
    """The tensor-core kernel for this BLOCK_K: "rows" where it fits (faster on an H100), else "tile"."""
    return "rows" if block_k >= ROWS_MIN_BLOCK_K else "tile"


def default_config(M: int, N: int, K: int, limits: KernelLimits, device) -> KernelConfig:
    """The heuristic configuration (used by the interpreter and when tuning is off)."""
    if interpreting():
        if M <= 2:
            bk = GEMV_MIN_BLOCK_K
            return KernelConfig(next_pow2(M), 32, bk, split_k=min(2, cdiv(K, bk)), num_stages=1, variant="gemv")
        if M <= DECODE_MAX_M:
            if limits.split_ok:
                bk, variant = limits.split_block_k, "split"
            else:
                bk, variant = min(32, limits.block_k_max), "tile"
            return KernelConfig(16, 32, bk, split_k=min(2, cdiv(K, bk)), num_stages=1, variant=variant)
        return KernelConfig(32, 32, min(32, limits.block_k_max), split_k=1, num_warps=4, num_stages=1)
    if M <= 2:
        return _gemv_config(M, N, K, limits.gemv_block_k[0], limits.gemv_block_n[0], device)
    if M <= DECODE_MAX_M:
        bk = min(256, limits.block_k_max)
        return _decode_config(N, K, bk, 64, _unpacking_variant(bk), device)
    bk = min(64, limits.block_k_max)
    return KernelConfig(128, 128, bk, num_warps=8, num_stages=3, variant=_unpacking_variant(bk))


def candidate_configs(M: int, N: int, K: int, limits: KernelLimits, device, allow_dense: bool) -> list:
    """A short list of configurations worth timing for this shape (the default first)."""
    first = default_config(M, N, K, limits, device)
    cands = [first]
    if M <= DECODE_MAX_M:
        for bn in (32, 64, 128):
            for bk in (64, 128):
                bk = min(bk, limits.block_k_max)
                if bk >= limits.split_block_k:
                    cands.append(_decode_config(N, K, bk, bn, "split", device))
                elif limits.block_k_max < ROWS_MIN_BLOCK_K:  # small groups: the tile kernel is all that fits
                    cands.append(_decode_config(N, K, bk, bn, "tile", device))
        for bn, bk in ((32, 128), (64, 128), (128, 128), (16, 256), (32, 256), (64, 256)):
            if ROWS_MIN_BLOCK_K <= bk <= limits.block_k_max:
                cands.append(_decode_config(N, K, bk, bn, "rows", device))
                if bn >= 64 and bk == 128:  # one warpgroup's 64 rows of W: wgmma with W in registers
                    cands.append(replace(cands[-1], weight_left=True))
        if M <= min(GEMV_MAX_M, limits.gemv_max_m):
            for bn in limits.gemv_block_n:
                for bk in limits.gemv_block_k:
                    for waves in (8, 1):
                        cands.append(_gemv_config(M, N, K, bk, bn, device, waves=waves))
        elif M <= limits.gemv_max_m:
            # More rows of x: shorter tiles, so that the per-row partial sums stay in registers.
            for bn in limits.gemv_block_n:
                for bk in (256, 512):
                    cands.append(_gemv_config(M, N, K, bk, bn, device))
    else:
        fold = limits.scaled and allow_dense  # fp16 activations: q * s may round to fp16
        for bm, bn, bk, warps, stages in (
            (128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (64, 128, 64, 4, 3),
            (128, 64, 64, 4, 3), (64, 64, 64, 4, 4), (128, 256, 32, 8, 3),
            (128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 128, 8, 3),
            # 256 rows of x share each decoded weight tile: fewer decode instructions per
            # multiply-add (bench/bench_kernel_instructions.py, prefill).
            (256, 128, 64, 8, 3), (256, 128, 128, 8, 2),
        ):
            if bm > 2 * next_pow2(M):
                continue
            bk = min(bk, limits.block_k_max)
            # Measured on an H100 at M = 2048: rows 2.5-10x faster than tile, so tile only where
            # rows does not fit at any BLOCK_K (groups of 32).
            variant = _unpacking_variant(bk)
            if variant == "tile" and limits.block_k_max >= ROWS_MIN_BLOCK_K:
                continue
            cfg = KernelConfig(bm, bn, bk, num_warps=warps, num_stages=stages, variant=variant)
            cands.append(cfg)
            if variant == "rows":
                if fold:
                    cfg = replace(cfg, fold_scales=True)
                    cands.append(cfg)
                # The weight as wgmma's register operand (see dot_rows); with fp16 only with the
                # scales folded, where the dot accumulates across K tiles and so overlaps decoding.
                cands.append(replace(cfg, weight_left=True))
        if allow_dense:
            cands.append(replace(first, variant="dense"))
            rows = dense_chunk_rows(M, device)
            if rows < N:
                cands.append(replace(first, variant="dense_chunks", block_n=rows))
            if limits.sparse24 and not sparse_tensor_cores.unsupported_reason(N, K, torch.float16, device):
                cands.append(replace(first, variant=sparse_tensor_cores.VARIANT))
    seen, unique = set(), []
    for c in cands:
        if c not in seen:
            seen.add(c)
            unique.append(c)
    return unique


_TUNED = {}
_TUNE_LOCK = threading.Lock()
SUMMED_IN_KERNEL_TIMED = 3  # split-K tiles the tuner also times summing in the kernel (pick_config)


def tuning_enabled() -> bool:
    return os.environ.get(TUNE_ENV, "1") not in ("0", "")


def pick_config(key, M, N, K, limits: KernelLimits, device, launch, allow_dense=False) -> KernelConfig:
    """The configuration for this shape: fixed under the interpreter or with tuning off, else the
    fastest candidate (timed once per key and cached; candidates that fail to compile or run out
    of shared memory are skipped). The ``SUMMED_IN_KERNEL_TIMED`` fastest tiles that split K are
    then timed again summing their partials in the kernel (``reduce_in_kernel``): that saves a
    launch, which favours more splits, but does not change a tile's own work, so it is tried on
    the tiles that already lead."""
    if interpreting() or device.type != "cuda" or not tuning_enabled():
        return default_config(M, N, K, limits, device)
    with _TUNE_LOCK:
        if key in _TUNED:
            return _TUNED[key]
        timed = [(_time_config(key, cfg, launch), i, cfg)
                 for i, cfg in enumerate(candidate_configs(M, N, K, limits, device, allow_dense))]
        split = [cfg for ms, _, cfg in sorted(timed)
                 if ms < float("inf") and cfg.split_k > 1 and cfg.variant not in WHOLE_WEIGHT_VARIANTS]
        for cfg in split[:SUMMED_IN_KERNEL_TIMED]:
            in_kernel = replace(cfg, reduce_in_kernel=True)
            timed.append((_time_config(key, in_kernel, launch), len(timed), in_kernel))
        best_ms, _, best = min(timed)
        if best_ms == float("inf"):
            raise RuntimeError(f"no kernel configuration could run for {key}")
        _TUNED[key] = best
        return best


def _time_config(key, cfg: KernelConfig, launch) -> float:
    """GPU ms per call of ``launch(cfg)`` (infinite where it fails to compile or run)."""
    try:
        ms = graph_time_ms([lambda: launch(cfg)] * 10)
    except Exception:  # noqa: BLE001 - a config that does not fit this GPU is just skipped
        torch.cuda.synchronize()
        return float("inf")
    if os.environ.get(TUNE_ENV) == "verbose":
        print(f"tune {key[:5]}: {cfg} {ms * 1e3:.1f} us", flush=True)
    return ms


def graph_time_ms(calls, repeats: int = 5) -> float:
    """GPU ms per call of ``calls`` (functions of no argument) without the CPU's launch overhead:
    all of them are recorded once in a CUDA graph, the graph is replayed ``repeats`` times, and the
    median replay time is divided by ``len(calls)``. (Launch overhead is the same for every
    configuration and vanishes in graph-replayed decode; timing eagerly would rank configurations
    by noise when kernels take a few microseconds.)"""
    for fn in calls:
        fn()  # compile and warm up outside the capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in calls:
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in calls:
            fn()
    graph.replay()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / len(calls))
    return sorted(times)[len(times) // 2]


def tuned_configs() -> dict:
    """What the tuner picked so far (for benchmark reports)."""
    return dict(_TUNED)


def check_config(cfg: KernelConfig, limits: KernelLimits, M: int):
    if cfg.variant not in VARIANTS:
        raise ValueError(f"unknown kernel variant {cfg.variant!r}; allowed: {', '.join(VARIANTS)}")
    if cfg.fold_scales and not (limits.scaled and cfg.variant == "rows"):
        raise ValueError("fold_scales needs the rows variant of a format with group scales (INT4, 2:4+INT4)")
    if cfg.weight_left and cfg.variant != "rows":
        raise ValueError(f"weight_left needs the rows variant (got variant={cfg.variant!r})")
    if cfg.reduce_in_kernel and cfg.variant in WHOLE_WEIGHT_VARIANTS:
        raise ValueError(f"reduce_in_kernel needs a Triton matmul variant, not {cfg.variant!r} (no split-K)")
    if cfg.variant == sparse_tensor_cores.VARIANT and not limits.sparse24:
        raise ValueError(f"the {cfg.variant} variant needs a 2:4 format (2:4, 2:4 + INT4)")
    if cfg.variant in WHOLE_WEIGHT_VARIANTS:
        return
    if cfg.variant == "gemv":
        if cfg.block_k < GEMV_MIN_BLOCK_K or cfg.block_k & (cfg.block_k - 1) or M > cfg.block_m:
            raise ValueError(
                f"the gemv variant needs block_k a power of two >= {GEMV_MIN_BLOCK_K} and M <= block_m "
                f"(got block_k={cfg.block_k}, M={M}, block_m={cfg.block_m})"
            )
        return
    if cfg.block_k > limits.block_k_max or limits.block_k_max % cfg.block_k:
        raise ValueError(f"block_k={cfg.block_k} must be a power of two dividing {limits.block_k_max}")
    if cfg.variant == "rows" and cfg.block_k < ROWS_MIN_BLOCK_K:
        raise ValueError(f"the rows variant needs block_k >= {ROWS_MIN_BLOCK_K} (got block_k={cfg.block_k})")
    if cfg.variant == "split" and (cfg.block_k < limits.split_block_k or M > cfg.block_m):
        raise ValueError(
            f"the split variant needs block_k >= {limits.split_block_k} and M <= block_m "
            f"(got block_k={cfg.block_k}, M={M}, block_m={cfg.block_m})"
        )


def check_fold(cfg: KernelConfig, dtype: torch.dtype):
    """Rounding ``q * s`` to the activation dtype is only accurate enough in fp16 (bf16 keeps 8
    bits: about 2^-9 relative error per weight)."""
    if cfg.fold_scales and dtype != torch.float16:
        raise ValueError(f"fold_scales needs float16 activations, got {dtype}")


def rows_arguments(cfg: KernelConfig, limits: KernelLimits) -> dict:
    """The launch arguments only the "rows" kernels take: ``W_LEFT``, and ``FOLD_SCALES`` for the
    formats with group scales."""
    if cfg.variant != "rows":
        return {}
    args = {"W_LEFT": cfg.weight_left}
    if limits.scaled:
        args["FOLD_SCALES"] = cfg.fold_scales
    return args


def check_activation(x: torch.Tensor, k: int, name: str):
    if x.dtype not in ACTIVATION_DTYPES:
        raise TypeError(f"{name}: activations must be float16 or bfloat16, got {x.dtype}")
    if x.shape[-1] != k:
        raise ValueError(f"{name}: x has {x.shape[-1]} input features, the weight expects {k}")
    if not (x.is_cuda or interpreting()):
        raise RuntimeError(f"{name}: Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 on CPU)")


def empty_result(x: torch.Tensor, N: int):
    """The output for an input with no rows (no kernel launch: a zero-size grid is invalid)."""
    return x.new_empty(*x.shape[:-1], N)


def as_2d(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return x2


def store_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a kernel should write for an output of ``dtype``. The interpreter converts
    fp32 -> bf16 by truncation (compiled Triton rounds to nearest), so under it bf16 outputs are
    written in fp32 and rounded by torch."""
    return torch.float32 if dtype == torch.bfloat16 and interpreting() else dtype


def grid_and_buffers(x2, N, cfg: KernelConfig, weight: torch.Tensor):
    """Launch grid, output buffers and tile counters ``(grid, y, ws, done)``. With split-K the
    kernel writes fp32 partials ``[split_k, M, N]``, which the last program of each tile to finish
    sums where the configuration reduces in the kernel and ``weight``'s tile counters can be used
    (``done``; see ``tile_counters``), else ``finish_split_k`` (``done`` is None)."""
    M = x2.shape[0]
    grid = (cdiv(M, cfg.block_m) * cdiv(N, cfg.block_n), cfg.split_k)
    y = torch.empty((M, N), dtype=store_dtype(x2.dtype), device=x2.device)
    ws = torch.empty((cfg.split_k, M, N), dtype=torch.float32, device=x2.device) if cfg.split_k > 1 else y
    done = None
    if cfg.split_k > 1 and cfg.reduce_in_kernel:
        done = tile_counters.for_weight(weight, N, grid[0])
    return grid, y, ws, done


def expand_into(out: torch.Tensor, write) -> torch.Tensor:
    """``out`` filled by ``write(target)``, an expand kernel's launch into a contiguous tensor of
    ``out``'s shape: ``out`` itself, or (bf16 under the interpreter, which stores no bf16) an fp32
    tensor then rounded into ``out`` by torch."""
    if store_dtype(out.dtype) == out.dtype:
        write(out)
    else:
        wide = torch.empty(out.shape, dtype=store_dtype(out.dtype), device=out.device)
        write(wide)
        out.copy_(wide)
    return out


def dense_chunk_rows(M: int, device, waves: int = 2) -> int:
    """Rows of W per chunk of the "dense_chunks" variant: enough for ``waves`` waves of cuBLAS's
    128 x 128 output tiles over the GPU's SMs at this M (fewer rows would idle SMs in every
    chunk's GEMM), in multiples of 128."""
    return cdiv(waves * _num_sms(device), cdiv(M, 128)) * 128


def dense_matmul(cfg: KernelConfig, x2: torch.Tensor, n: int, expand_rows, bias) -> torch.Tensor:
    """The "dense" and "dense_chunks" variants: ``x2 @ W^T`` by cuBLAS on W expanded by a Triton
    kernel (``expand_rows(target, n0, n1)`` writes rows n0..n1 of W into the contiguous
    ``target``), all at once ("dense") or ``cfg.block_n`` rows at a time through one reused buffer
    ("dense_chunks"), each chunk multiplied into its columns of y. A chunk's temporary weight is
    ``rows x K`` instead of ``N x K`` (at 28672 x 8192 and M = 2048 on 132 SMs: 36 MB instead of
    470 MB), small enough to stay in an H100's 50 MB L2 cache between the expand kernel's writes
    and cuBLAS's reads. The bias is added inside the GEMM: in its fp32 sum, before the one
    rounding to x2's dtype, as the kernels do (added after, the product would be rounded twice),
    and with no extra pass over the output."""
    m, k = x2.shape
    rows = n if cfg.variant == "dense" else cfg.block_n
    y = torch.empty((m, n), dtype=x2.dtype, device=x2.device)
    buffer = torch.empty((min(rows, n), k), dtype=x2.dtype, device=x2.device)
    for n0 in range(0, n, rows):
        n1 = min(n, n0 + rows)
        w = expand_into(buffer[: n1 - n0], lambda target: expand_rows(target, n0, n1))
        # y's column slice has unit column stride and a row stride >= its width: torch hands it
        # to cuBLAS as it is (a leading dimension), so the GEMM writes y in place, no copy.
        if bias is None:
            torch.mm(x2, w.t(), out=y[:, n0:n1])
        else:
            torch.addmm(bias[n0:n1].to(x2.dtype), x2, w.t(), out=y[:, n0:n1])
    return y


def finish_split_k(ws, y, bias, cfg: KernelConfig, dtype: torch.dtype, done=None):
    """Reduce the split-K partials (if any, and unless the kernel did: ``done``) and return the
    output in ``dtype``."""
    if cfg.split_k > 1 and done is None:
        _reduce(ws, y, bias, cfg)
    return y if y.dtype == dtype else y.to(dtype)


def _reduce(ws, y, bias, cfg: KernelConfig):
    M, N = y.shape
    block = 1024
    _splitk_reduce_kernel[(cdiv(M * N, block),)](
        ws, bias if bias is not None else y, y, M * N, N,
        SPLIT_K=cfg.split_k, HAS_BIAS=bias is not None, BLOCK=block,
    )


@triton.jit
def tile_ids(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped tile order: GROUP_M row tiles share each column tile while it is in L2."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_n
    group = pid // width
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    return pid_m, pid_n


@triton.jit
def program_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's rows and columns of the output (grouped order) and its split-K index."""
    pid_m, pid_n = tile_ids(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    return pid_m * BLOCK_M + tl.arange(0, BLOCK_M), pid_n * BLOCK_N + tl.arange(0, BLOCK_N), tl.program_id(1)


@triton.jit
def k_range(pid_k, num_tiles, SPLIT_K: tl.constexpr):
    """The contiguous run of K tiles handled by split ``pid_k``."""
    per_split = tl.cdiv(num_tiles, SPLIT_K)
    start = pid_k * per_split
    end = tl.minimum(start + per_split, num_tiles)
    return start, end


@triton.jit
def load_x_tile(x_ptr, offs_m, offs_k, stride_xm, M, K):
    mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :]
    return tl.load(ptrs, mask=mask, other=0.0)


FLOAT_2_23_BITS = 0x4B000000  # the float32 2^23: a nibble OR-ed into its mantissa is read exactly


@triton.jit
def word_field_code(words, high, magic, i: tl.constexpr):
    """Field ``i`` (bits 4i .. 4i + 3, offset binary) of int32 ``words`` as the float32 code
    ``nib - 8``, read in place rather than shifted down: ``(word & 0xF << 4i) | 2^23`` as a float
    is ``2^23 + nib * 16^i`` exactly (one LOP3, ``magic`` being the bits of 2^23 in a register),
    and one FMA (times ``16^-i``, minus ``2^23 * 16^-i + 8``) leaves the code exactly. The
    mantissa has 23 bits: fields 5-7 are read from ``high = words >> 12``."""
    if i < 5:
        source, shift = words, 4 * i
    else:
        source, shift = high, 4 * i - 12
    field = ((source & (0xF << shift)) | magic).to(tl.float32, bitcast=True)
    return field * (1.0 / (1 << shift)) - (8388608.0 / (1 << shift) + 8.0)


@triton.jit
def nibble_value(nib):
    """A 4-bit code (int32 0..15, offset binary) as the float32 ``nib - 8``, exactly: the nibble
    becomes the low mantissa bits of 2^23 (an OR and a subtract, no int-to-float conversion)."""
    return (nib | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0


@triton.jit
def gemv_masks(offs_m, offs_n, unit, M, N, units_in_k, EVEN_K: tl.constexpr):
    """Masks of a gemv tile's weight ``[BLOCK_N, len(unit)]`` and x ``[BLOCK_M, len(unit)]`` loads,
    ``unit`` indexing runs of columns (packed words, 2:4 groups): only the rows when no tile runs
    past K (``EVEN_K``)."""
    mask = (offs_n < N)[:, None]
    x_mask = (offs_m < M)[:, None]
    if not EVEN_K:
        inside = (unit < units_in_k)[None, :]
        mask = mask & inside
        x_mask = x_mask & inside
    return mask, x_mask


@triton.jit
def small_ints_as(q, dtype: tl.constexpr):
    """Integers ``q`` in -8..7 (INT4 codes, 0 for pruned weights) as exact values of the float
    ``dtype``, without an int-to-float conversion (a quarter-rate instruction on NVIDIA GPUs):
    ``q + 8`` becomes the low mantissa bits of 1024 (fp16), 128 (bf16) or 2^23 (fp32), and one
    subtraction removes the offset."""
    if dtype == tl.float16:
        return (q + 0x6408).to(tl.int16).to(tl.float16, bitcast=True) - 1032.0
    elif dtype == tl.bfloat16:
        return (q + 0x4308).to(tl.int16).to(tl.bfloat16, bitcast=True) - 136.0
    else:
        return nibble_value(q + 8)


@triton.jit
def dot_operand(b, dtype: tl.constexpr):
    """``b`` in the dot's ``dtype``: integer codes through :func:`small_ints_as`, float values cast
    (exact for values stored in the activation dtype)."""
    if b.dtype.is_int():
        return small_ints_as(b, dtype)
    else:
        return b.to(dtype)


@triton.jit
def dot_tile(a, b, UPCAST: tl.constexpr):
    """fp32-accumulated ``a @ b``; b is converted to a's dtype (exactly: INT4 codes, or values
    stored in the activation dtype)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), dot_operand(b, tl.float32))
    return tl.dot(a, dot_operand(b, a.dtype))


@triton.jit
def rows_accumulator(BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, W_LEFT: tl.constexpr):
    """The fp32 accumulator of a "rows" kernel: ``[BLOCK_M, BLOCK_N]``, or transposed with
    ``W_LEFT`` (see :func:`dot_rows`)."""
    if W_LEFT:
        return tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        return tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)


@triton.jit
def rows_result(acc, W_LEFT: tl.constexpr):
    """The ``[BLOCK_M, BLOCK_N]`` output tile of a "rows" accumulator."""
    if W_LEFT:
        return tl.trans(acc)
    else:
        return acc


@triton.jit
def dot_rows(acc, a, w_rows, UPCAST: tl.constexpr, W_LEFT: tl.constexpr):
    """``acc`` plus the fp32 product of ``a [BLOCK_M, BLOCK_K]`` and a weight tile ``[BLOCK_N,
    BLOCK_K]`` held row-wise (converted to a's dtype first, so any layout change moves 16-bit
    values). By default ``acc += a @ w_rows^T``. ``W_LEFT``: ``acc^T += w_rows @ a^T``, the
    decoded tile as the left operand; on Hopper that is the operand wgmma reads from registers,
    so the tile skips the round trip through shared memory, and where ``acc`` carries the sum
    across K tiles Triton splits the dot along K and decodes the next slice while the tensor
    cores work."""
    if UPCAST:
        a = a.to(tl.float32)
    w = dot_operand(w_rows, a.dtype)
    if W_LEFT:
        return tl.dot(w, tl.trans(a), acc)
    else:
        return tl.dot(a, tl.trans(w), acc)


@triton.jit
def scaled_dot_rows(acc, a, q_rows, s, FOLD_SCALES: tl.constexpr, UPCAST: tl.constexpr, W_LEFT: tl.constexpr):
    """:func:`dot_rows` for a tile of exact codes ``q_rows [BLOCK_N, BLOCK_K]`` in a's dtype and
    its rows' group scales ``s [BLOCK_N]`` (fp16). Exact by default: the scale multiplies the
    tile's fp32 partial product. ``FOLD_SCALES`` (fp16 only) rounds ``q * s`` to fp16 in the
    tile, as the dense path does, so that the tensor cores accumulate across K tiles with no
    per-tile scaling on the CUDA cores."""
    if FOLD_SCALES:
        return dot_rows(acc, a, q_rows.to(tl.float16) * s[:, None], UPCAST, W_LEFT)
    part = dot_rows(tl.zeros_like(acc), a, q_rows, UPCAST, W_LEFT)
    if W_LEFT:
        return acc + part * s.to(tl.float32)[:, None]
    else:
        return acc + part * s.to(tl.float32)[None, :]


@triton.jit
def interleave4(h0, h1, h2, h3):
    """``[R, W]`` x 4 -> ``[R, 4W]`` with ``h_p`` at column ``4j + p``. Joins add a dimension
    inside each thread, so each run of 4 stays in one thread (no shuffles, no shared memory)."""
    w = tl.join(tl.join(h0, h2), tl.join(h1, h3))
    return tl.reshape(w, (h0.shape[0], h0.shape[1] * 4))


@triton.jit
def interleave8(f0, f1, f2, f3, f4, f5, f6, f7):
    """``[R, W]`` x 8 -> ``[R, 8W]`` with ``f_i`` at column ``8j + i``, each run of 8 in one thread."""
    w = tl.join(tl.join(tl.join(f0, f4), tl.join(f2, f6)), tl.join(tl.join(f1, f5), tl.join(f3, f7)))
    return tl.reshape(w, (f0.shape[0], f0.shape[1] * 8))


@triton.jit
def unpack_fields(words, BITS: tl.constexpr, FIELDS: tl.constexpr):
    """The ``FIELDS`` fields (``BITS`` wide) of each int32 word of ``words [R, W]``, in order along
    the row: int32 ``[R, W * FIELDS]``."""
    shifts = BITS * tl.arange(0, FIELDS)
    fields = (words[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)
    return tl.reshape(fields, (words.shape[0], words.shape[1] * FIELDS))


@triton.jit
def lane_halves(pairs, dtype: tl.constexpr, UPCAST: tl.constexpr):
    """The two 16-bit halves of int32 ``pairs`` as ``dtype`` (fp16, bf16) floats. ``UPCAST`` (the
    interpreter, whose bf16 arithmetic is wrong): bf16 halves as float32 of the same value."""
    if dtype == tl.float16:
        lo = pairs.to(tl.int16).to(tl.float16, bitcast=True)
        hi = (pairs >> 16).to(tl.int16).to(tl.float16, bitcast=True)
    elif not UPCAST:
        lo = pairs.to(tl.int16).to(tl.bfloat16, bitcast=True)
        hi = (pairs >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)
    else:
        lo = (pairs << 16).to(tl.float32, bitcast=True)
        hi = (pairs & -65536).to(tl.float32, bitcast=True)
    return lo, hi


@triton.constexpr_function
def int4_code_base(dtype):
    """The 16-bit float that :func:`int4_word_fields` reads for code 8 (the value 0) before the
    offset is removed: fp16 1024 + 8, bf16 128 + 8."""
    return 1032.0 if dtype == tl.float16 else 136.0


@triton.jit
def _field_pair(words, SHIFT: tl.constexpr, dtype: tl.constexpr, UPCAST: tl.constexpr, BASED: tl.constexpr):
    """Codes ``SHIFT/4`` and ``SHIFT/4 + 4`` of each word as exact ``dtype`` values ``code - 8``:
    one AND and one OR put both nibbles into the mantissas of a pair of 16-bit floats, the two
    halves of one 32-bit register (fp16 1024 + nibble, bf16 128 + nibble: a unit step there), and
    one paired subtraction removes the base and the offset (see :func:`lane_halves` for
    ``UPCAST``). ``BASED`` skips the subtraction: the values are ``code - 8 + int4_code_base(dtype)``."""
    if dtype == tl.float16:
        lo, hi = lane_halves(((words >> SHIFT) & 0x000F000F) | 0x64006400, dtype, UPCAST)
    else:
        lo, hi = lane_halves(((words >> SHIFT) & 0x000F000F) | 0x43004300, dtype, UPCAST)
    if BASED:
        return lo, hi
    return lo - int4_code_base(dtype), hi - int4_code_base(dtype)


@triton.jit
def int4_word_fields(words, dtype: tl.constexpr, UPCAST: tl.constexpr, BASED: tl.constexpr = False):
    """The 8 codes of each int32 word (offset binary) as exact ``dtype`` (fp16, bf16) values
    ``code - 8`` (``BASED``: plus :func:`int4_code_base`): eight ``[R, W]`` tensors, field i of
    every word in the i-th. About one instruction per code, where shift-mask-convert per code
    takes several."""
    f0, f4 = _field_pair(words, 0, dtype, UPCAST, BASED)
    f1, f5 = _field_pair(words, 4, dtype, UPCAST, BASED)
    f2, f6 = _field_pair(words, 8, dtype, UPCAST, BASED)
    f3, f7 = _field_pair(words, 12, dtype, UPCAST, BASED)
    return f0, f1, f2, f3, f4, f5, f6, f7


@triton.jit
def int4_words_as(words, dtype: tl.constexpr, UPCAST: tl.constexpr):
    """INT4 words ``[R, W]`` (field i = column 8j + i) -> exact ``dtype`` codes ``[R, 8W]``."""
    f0, f1, f2, f3, f4, f5, f6, f7 = int4_word_fields(words, dtype, UPCAST)
    return interleave8(f0, f1, f2, f3, f4, f5, f6, f7)


@triton.jit
def spread_sorted_pairs(v0, v1, field, empty=0.0):
    """Dense rows ``[R, 4G]`` from the kept pair ``(v0, v1)`` of each group of 4 (``[R, G]``) at the
    positions of ``field = i0 | i1 << 2``, ``empty`` at the pruned ones. Relies on ``i0 < i1`` (a
    format invariant): position 0 can only hold v0 and position 3 only v1, so six selects build
    the group."""
    i0 = field & 3
    i1 = field >> 2
    pruned = tl.full(v0.shape, empty, v0.dtype)
    h0 = tl.where(i0 == 0, v0, pruned)
    h1 = tl.where(i0 == 1, v0, tl.where(i1 == 1, v1, pruned))
    h2 = tl.where(i1 == 2, v1, tl.where(i0 == 2, v0, pruned))
    h3 = tl.where(i1 == 3, v1, pruned)
    return interleave4(h0, h1, h2, h3)


@triton.jit
def store_result(acc, y_ptr, ws_ptr, done_ptr, bias_ptr, offs_m, offs_n, M, N, pid_k,
                 SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, REDUCE_IN_KERNEL: tl.constexpr):
    """Write the tile: cast (+ bias) into y, or the fp32 partial of split ``pid_k``. With
    ``REDUCE_IN_KERNEL`` the program then counts itself done on its tile's counter (``done_ptr``,
    indexed by program_id(0), the output tile), and the last of the tile's ``SPLIT_K`` programs
    sums the partials in split order (as ``finish_split_k`` does: the same result, bit for bit),
    writes y and sets the counter back to zero for the next launch. The barrier puts every
    thread's partial before the count, whose release (acq_rel, one thread) publishes them to the
    GPU; the last program's acquire and the loads through L2 (``.cg``) read them back."""
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    rows = offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    if SPLIT_K == 1:
        _store_output(acc, y_ptr, bias_ptr, offs_n, rows, mask, N, HAS_BIAS)
    else:
        plane = tl.cast(M, tl.int64) * N  # one split's partials
        tl.store(ws_ptr + pid_k * plane + rows, acc, mask=mask)
        if REDUCE_IN_KERNEL:
            tl.debug_barrier()
            counter = done_ptr + tl.program_id(0)
            if tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == SPLIT_K - 1:
                total = tl.zeros_like(acc)
                for s in tl.static_range(SPLIT_K):
                    total += tl.load(ws_ptr + s * plane + rows, mask=mask, other=0.0, cache_modifier=".cg")
                _store_output(total, y_ptr, bias_ptr, offs_n, rows, mask, N, HAS_BIAS)
                tl.atomic_xchg(counter, 0)


@triton.jit
def _store_output(acc, y_ptr, bias_ptr, offs_n, rows, mask, N, HAS_BIAS: tl.constexpr):
    """``acc`` (+ bias, in fp32) rounded once into y."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows, acc.to(y_ptr.dtype.element_ty), mask=mask)


def expand_blocks() -> tuple:
    """(BLOCK_N, BLOCK_K) of the kernels that expand a packed weight to dense (large tiles on a GPU)."""
    return (32, 64) if interpreting() else (64, 128)


@triton.jit
def store_rows(out_ptr, w, offs_n, offs_k, N, K):
    """Store rows ``offs_n``, columns ``offs_k`` of the dense ``W [N, K]`` from the tile ``w``
    ``[BLOCK_N, BLOCK_K]`` (decoded along K, so each thread writes contiguous runs of a row)."""
    mask = (offs_n < N)[:, None] & (offs_k < K)[None, :]
    ptrs = out_ptr + offs_n.to(tl.int64)[:, None] * K + offs_k[None, :]
    tl.store(ptrs, w.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _splitk_reduce_kernel(ws_ptr, bias_ptr, y_ptr, MN, N, SPLIT_K: tl.constexpr,
                          HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(ws_ptr + s * MN + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)
