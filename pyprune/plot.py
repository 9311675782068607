"""``pyprune plot REPORT.json``: per-layer sparsity and estimated error of a pruning run as a PNG.

Top panel: the sparsity each decoder layer achieved (bars, coloured by level for the hessian
schedule), the sparsity the schedule assigned (dots), the mean and the allowed range.
Bottom panel (log scale): the schedule's per-layer estimate (OBS error estimate for ``hessian``,
dense and as re-estimated during pruning; outlier ratio for ``owl``, on its own axis) and the
solver's actual loss per layer, so one sees whether the estimate tracks the loss.

Reads only the JSON report (``schedule`` = the schedule's ``describe()``, ``linears`` = the
per-Linear records), so it works on reports copied from another machine.
"""
import argparse
import json
import os
import re
import sys
from collections import defaultdict

_LAYER = re.compile(r"\.(\d+)\.")


def _layer_of(name: str) -> int:
    match = _LAYER.search("." + name)
    if match is None:
        raise ValueError(f"cannot find a decoder layer index in Linear name {name!r}")
    return int(match.group(1))


def per_layer(records):
    """``{layer: {"sparsity": achieved (parameter-weighted), "loss": sum, "parameters": n}}``."""
    acc = defaultdict(lambda: {"zeros": 0.0, "parameters": 0, "loss": 0.0})
    for r in records:
        k = _layer_of(r["name"])
        n = r["shape"][0] * r["shape"][1]
        acc[k]["zeros"] += r["achieved_sparsity"] * n
        acc[k]["parameters"] += n
        loss = r.get("loss")
        if loss is not None and loss == loss:
            acc[k]["loss"] += loss
    return {k: {"sparsity": v["zeros"] / v["parameters"], "loss": v["loss"], "parameters": v["parameters"]}
            for k, v in sorted(acc.items())}


def _schedule_per_layer(units):
    """Layer -> assigned sparsity (weighted), estimates (summed), level (of the layer's largest unit)."""
    out = defaultdict(lambda: {"w": 0.0, "p": 0, "est": 0.0, "dense": 0.0, "has_real": True, "level": None,
                               "ratio": None, "biggest": -1, "loss_est": 0.0})
    for u in units:
        e = out[u["layer"]]
        e["w"] += u["sparsity"] * u["parameters"]
        e["p"] += u["parameters"]
        if "estimate" in u:
            e["est"] += u["estimate"]
            e["dense"] += u.get("estimate_dense") or 0.0
            e["has_real"] &= u.get("estimate_real") is not None
            e["loss_est"] += u.get("loss_estimate", u["estimate"])
        if "outlier_ratio" in u:
            e["ratio"] = u["outlier_ratio"]
        if u["parameters"] > e["biggest"]:
            e["biggest"], e["level"] = u["parameters"], u.get("level")
    return {k: dict(v, sparsity=v["w"] / v["p"]) for k, v in sorted(out.items())}


def plot_report(report, out: str = None) -> str:
    """Draw ``report`` (a path or the loaded dict) to ``out`` (default: REPORT with .png). Returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = report if isinstance(report, str) else None
    if path is not None:
        with open(path) as f:
            report = json.load(f)
    if out is None:
        if path is None:
            raise ValueError("give an output path when the report is not read from a file")
        out = os.path.splitext(path)[0] + ".png"
    records = report.get("linears") or []
    if not records:
        raise ValueError("the report has no per-Linear records ('linears'); nothing to plot")
    achieved = per_layer(records)
    schedule = report.get("schedule") or {}
    planned = _schedule_per_layer(schedule.get("units") or [])
    layers = list(achieved)

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(7.0, 0.28 * len(layers) + 3), 7.5), sharex=True,
                                      gridspec_kw={"height_ratios": [1.1, 1]})
    levels = [planned.get(k, {}).get("level") for k in layers]
    if any(level is not None for level in levels):
        cmap = plt.get_cmap("viridis")
        top_level = max(level for level in levels if level is not None) or 1
        colours = [cmap(0.15 + 0.7 * (level or 0) / top_level) for level in levels]
    else:
        colours = ["tab:blue"] * len(layers)
    top.bar(layers, [achieved[k]["sparsity"] for k in layers], color=colours, alpha=0.85, label="achieved")
    if planned:
        top.plot(layers, [planned[k]["sparsity"] for k in layers], "o", color="black", ms=3.5, label="assigned")
    params = [achieved[k]["parameters"] for k in layers]
    mean = sum(achieved[k]["sparsity"] * p for k, p in zip(layers, params)) / sum(params)
    top.axhline(mean, color="tab:red", lw=1, ls="--", label=f"mean {mean:.4f}")
    if "range" in schedule:
        lo, hi = schedule["range"]
        top.axhspan(lo, hi, color="tab:gray", alpha=0.12, label=f"range [{lo:g}, {hi:g}]")
    spars = [achieved[k]["sparsity"] for k in layers]
    for k, level in zip(layers, levels):
        if level is not None:
            top.text(k, achieved[k]["sparsity"] + 0.006, str(level), ha="center", va="bottom", fontsize=7)
    top.set_ylim(max(0.0, min(spars) - 0.08), min(1.0, max(spars) + 0.12))
    top.set_ylabel("sparsity" + (" (level above each bar)" if any(v is not None for v in levels) else ""))
    top.legend(loc="upper left", fontsize=7, ncol=4)
    top.grid(axis="y", alpha=0.3)

    losses = [achieved[k]["loss"] for k in layers]
    if any(x > 0 for x in losses):
        bottom.semilogy(layers, [x if x > 0 else float("nan") for x in losses], "s-", color="tab:orange",
                        ms=3, label="solver loss (actual)")
    normalised = schedule.get("normalise", "none") != "none"
    real = planned and all(planned[k]["has_real"] for k in layers)
    if planned and any(planned[k]["loss_est"] > 0 for k in layers if k in planned):
        bottom.semilogy(layers, [planned[k]["loss_est"] for k in layers], "o-", color="tab:blue", ms=3,
                        label="OBS estimate" + (" (real inputs)" if real else ""))
        if not normalised and any(planned[k]["dense"] > 0 for k in layers) and any(planned[k]["has_real"] for k in layers):
            bottom.semilogy(layers, [planned[k]["dense"] for k in layers], ":", color="tab:blue",
                            label="OBS estimate (dense pre-pass)")
    bottom.set_ylabel("loss (mean per-token squared error)")
    bottom.grid(alpha=0.3, which="both")
    if planned and normalised and any(planned[k]["est"] > 0 for k in layers):
        by = {"output": "output energy", "residual": "residual-stream energy"}.get(schedule["normalise"],
                                                                                 schedule["normalise"])
        twin = bottom.twinx()
        twin.semilogy(layers, [planned[k]["est"] for k in layers], "d--",
                      color="tab:purple", ms=3, label=f"estimate / {by} (allocation score)")
        twin.set_ylabel("relative estimate")
        twin.legend(loc="lower right", fontsize=8)
    if planned and any(planned[k]["ratio"] is not None for k in layers):
        twin = bottom.twinx()
        twin.plot(layers, [planned[k]["ratio"] for k in layers], "^-", color="tab:green", ms=3,
                  label="outlier ratio (OWL)")
        twin.set_ylabel("outlier ratio")
        twin.legend(loc="upper right", fontsize=8)
    if bottom.get_legend_handles_labels()[0]:
        bottom.legend(loc="upper left", fontsize=8)
    bottom.set_xlabel("decoder layer")

    title = [str(report.get("model", "")), f"schedule {schedule.get('schedule', '?')}"]
    if schedule.get("levels_used") is not None:
        title.append(f"{schedule['levels_used']} levels")
    ppl = (report.get("totals") or {}).get("ppl")
    if ppl is not None:
        title.append(f"ppl {ppl:.3f}")
    fig.suptitle(", ".join(t for t in title if t))
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def add_arguments(parser: argparse.ArgumentParser):
    parser.add_argument("report", help="JSON report written by `pyprune prune`")
    parser.add_argument("--out", "-o", default=None, help="PNG path (default: REPORT with .png)")


def run(args) -> str:
    out = plot_report(args.report, args.out)
    print(out)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="pyprune plot", description=__doc__.splitlines()[0])
    add_arguments(parser)
    try:
        run(parser.parse_args(argv))
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
