"""The JSON report every run writes: per Linear entries, totals, configuration, versions."""
import json
import os
import platform
import time


def versions() -> dict:
    import torch
    import transformers

    from pyprune import __version__
    from pyprune.ops._extension import extension_error

    out = {
        "pyprune": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "cuda_extension": "loaded" if extension_error() is None else "unavailable",
    }
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        pass
    return out


def totals(records) -> dict:
    """Achieved sparsity over all pruned weights, weighted by size, and solver totals."""
    params = sum(r["shape"][0] * r["shape"][1] for r in records)
    zeros = sum(r["achieved_sparsity"] * r["shape"][0] * r["shape"][1] for r in records)
    relative = [r["relative_error"] for r in records if r.get("relative_error") is not None]
    return {
        "linears": len(records),
        "parameters": params,
        "achieved_sparsity": zeros / params if params else 0.0,
        "solver_seconds": sum(r["seconds"] for r in records),
        "loss_sum": sum(r["loss"] for r in records if r["loss"] == r["loss"]),
        # mean over Linears of ||(W - W_final) X||^2 / ||W X||^2: the fraction of each output destroyed
        "mean_relative_error": sum(relative) / len(relative) if relative else None,
    }


def write_report(path: str, report: dict):
    report = dict(report, written_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1, default=str)
    os.replace(tmp, path)
