"""The sequential calibration runner.

1. Check every Linear against the requested pattern before any expensive work.
2. Capture the inputs of decoder layer 0 on the calibration windows.
3. For each decoder layer, alone on the compute device: run it with hooks that accumulate each
   Linear's Hessian; let the schedule see the statistics; call the solver on every Linear; run
   the pruned layer again to produce the next layer's inputs; save progress.

With ``true_sequential`` step 3 goes through the layer's Linears group by group, in the order the
forward reaches them (Linears that read the same tensor form one group: q/k/v, o, gate/up, down):
each group's statistics are collected with the groups before it already compressed, so a Linear
is calibrated on the inputs it will really see.

With ``teacher`` a second stream of activations runs beside the first: the teacher, the model
pruned but not quantized. Each layer is first pruned on the teacher's statistics, exactly as in the
run without quantization; then the quantizer goes group by group (as with ``true_sequential``) on
the quantized model's own inputs plus their cross term with the teacher's (``pyprune.ops.teacher``),
so that each Linear reproduces the teacher's output from the drifted inputs it really sees.

With ``scale_tuning`` (INT4 only) each layer's outputs before compression are kept as a target;
once every Linear of the layer is quantized, its group scales are tuned together towards that
target (``pipeline.scale_tuning``) before the layer's outputs go on to the next layer.
"""
import contextlib
import copy
import hashlib
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

from pyprune.models.capture import run_layer
from pyprune.models.families import (
    decoder_layers, describe_linears, find_layer_list_path, prunable_linears, set_weight_matrix,
    weight_matrix,
)
from pyprune.pipeline.activations import ActivationStore, check_storage, estimate_for_run, format_estimate
from pyprune.pipeline.prepass import run_prepass
from pyprune.pipeline.progress import ProgressStore
from pyprune.pipeline.scale_tuning import ScaleTuning, describe as describe_tuning, tune_layer_scales
from pyprune.pipeline.statistics import (
    HessianCollector, InputNormCollector, InputRecorder, PairedCollector, StatisticsComplete, check_sink_weight,
)
from pyprune.solvers import get_solver, statistics_needed
from pyprune.solvers.base import LayerStats, output_energy, reconstruction_loss


@dataclass
class RunOptions:
    device: str = "cpu"
    activations: str = "device"  # where calibration activations live: "device", "cpu" or "disk"
    activations_dir: Optional[str] = None  # folder of the "disk" activation files (default: system temp)
    batch_size: int = 1
    progress_dir: Optional[str] = None
    resume: bool = False
    show_progress: bool = True
    fingerprint: dict = field(default_factory=dict)  # identifies the run for --resume
    distributed: Optional[object] = None  # a pipeline.distributed.DistributedPruning: work split over ranks
    # Collect full Hessians for solvers that read only input norms (wanda), so that the report has
    # each Linear's reconstruction loss; False keeps in_features numbers per Linear, not in_features**2.
    layer_loss: bool = True
    # The first token of each calibration window counts as this many tokens in the statistics
    # (pipeline.statistics: the attention sink); 1 = plain token average.
    sink_weight: float = 1.0
    # Shrink the first token's input row to the window's median row length first (pipeline.statistics).
    sink_cap: bool = False
    # Collect statistics and solve group by group within each layer (module docstring).
    true_sequential: bool = False
    # Calibrate the quantizer (post_solve) against the pruned, unquantized model (module docstring).
    teacher: bool = False
    # Tune each layer's INT4 group scales together against its output before compression.
    scale_tuning: Optional[ScaleTuning] = None

    def __post_init__(self):
        check_storage(self.activations)
        check_sink_weight(self.sink_weight)
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size}: must be at least 1")


# post_solve(name, W_pruned, solver_result, stats, original=W) -> (W_final, extra report fields);
# ``original`` is the weight before the pruning solver.
PostSolve = Callable


def check_model(model, target):
    """Refuse, before any work, a pattern that cannot apply to some Linear."""
    infos = describe_linears(model)
    if not infos:
        raise ValueError("the model's decoder layers contain no Linear layers to prune")
    for info in infos:
        target.check_width(info.in_features, info.name)
    return infos


@torch.no_grad()
def prune_model(model, tokens: Optional[torch.Tensor], method: str, schedule, solver_options=None,
                options: RunOptions = None, post_solve: PostSolve = None, layer_io=None) -> dict:
    """Prune every Linear of every decoder layer of ``model`` (on CPU, modified in place).

    ``tokens``: ``[nsamples, seqlen]`` calibration ids (may be None for statistics-free methods).
    ``layer_io``: loads and writes out decoder layers of a model streamed from disk
    (``pipeline.streaming.LayerStreamer``); None for a model held in memory.
    Returns ``{"records": [...], "seconds": float, "resumed_from": int}``.
    """
    options = options or RunOptions()
    solver_options = solver_options or {}
    # ``method`` is a registered solver name or a solver function (e.g. the joint INT4 sweep).
    solve = get_solver(method) if isinstance(method, str) else method
    method = method if isinstance(method, str) else getattr(method, "__name__", "custom")
    check_model(model, schedule.target)
    statistics = statistics_kind(solve, schedule, post_solve, options.layer_loss)
    needs_stats = statistics is not None
    if needs_stats and tokens is None:
        raise ValueError(f"method {method!r} needs calibration data")
    if options.true_sequential and needs_stats and getattr(schedule, "online", False):
        raise ValueError(f"schedule {getattr(schedule, 'name', schedule)!r} corrects its plan online from the "
                         "statistics of a whole layer, which true_sequential collects group by group: "
                         "use it without online correction or without true_sequential")
    if options.teacher:
        _check_teacher_run(solve, post_solve, statistics, options, layer_io)
    if options.scale_tuning is not None:
        _check_scale_tuning_run(post_solve, statistics, options)
    device = torch.device(options.device)
    store = ActivationStore(options.activations, device, options.activations_dir)
    dist = options.distributed
    local_tokens = dist.shard(tokens) if dist is not None else tokens  # this rank's windows
    layers = decoder_layers(model)
    prefix = find_layer_list_path(model)
    start_time = time.time()

    progress = None
    if options.progress_dir:
        fingerprint = dict(options.fingerprint, method=method, statistics=statistics,
                           sink_weight=options.sink_weight, solver_options=_jsonable(solver_options),
                           tokens=_tensor_digest(tokens))
        if options.true_sequential:
            fingerprint["true_sequential"] = True
        if options.sink_cap:
            fingerprint["sink_cap"] = True
        if hasattr(schedule, "config"):
            fingerprint["schedule"] = _jsonable(schedule.config())
        folder = options.progress_dir
        if dist is not None:  # each rank keeps its own windows' activations
            fingerprint["world_size"] = dist.world_size
            folder = os.path.join(folder, f"rank{dist.rank}")
        progress = ProgressStore(folder, fingerprint)
    records, first, inputs, kwargs = [], 0, None, None
    if progress is not None and options.resume:
        saved = progress.load()
        if saved is not None:
            first, records, inputs, extra, weights = saved
            _restore_layers(layers, weights)
            if hasattr(schedule, "restore"):
                schedule.restore(extra.get("schedule", {}))
    if needs_stats and getattr(schedule, "needs_prepass", lambda: False)():
        if layer_io is not None:
            raise NotImplementedError(f"schedule {getattr(schedule, 'name', schedule)!r} needs a dense pre-pass, "
                                      "which streamed runs do not support yet")
        # Distributed: every rank runs the pre-pass on all windows, so all make the same plan.
        run_prepass(schedule, model, tokens, options)  # dense statistics of every layer, before any pruning
    activations = None
    if needs_stats:
        estimate, shape, dtype = estimate_for_run(model, local_tokens, options.batch_size)
        activations = dict(store.describe(), estimate=estimate)
        if options.show_progress and (dist is None or dist.is_main):
            tqdm.write(format_estimate(estimate, options.activations, device, shape, dtype), file=sys.stderr)
        with layer_io.capturing(local_tokens) if layer_io is not None else contextlib.nullcontext():
            fresh, kwargs = store.capture(model, local_tokens, options.batch_size)
        inputs = fresh if inputs is None else store.adopt(inputs)
    teacher_inputs = inputs.clone() if options.teacher else None  # both models see the same layer-0 inputs

    bar = tqdm(range(first, len(layers)), desc="layers", disable=not options.show_progress)
    for index in bar:
        layer = (layer_io.load_layer(index) if layer_io is not None else layers[index]).to(device)
        linears = prunable_linears(layer)
        if options.teacher:
            layer_records, teacher_inputs, inputs = _solve_layer_with_teacher(
                layer, index, f"{prefix}.{index}", linears, teacher_inputs, inputs, kwargs, solve, statistics,
                schedule, solver_options, post_solve, options, device, store, bar, index + 1 == len(layers))
            records.extend(layer_records)
            layers[index] = layer.to("cpu")
            continue
        layer_start = len(records)
        targets = None
        if options.scale_tuning is not None:  # the layer's outputs before compression
            targets = _forward_all(layer, inputs, kwargs, options.batch_size, device, store)
        groups = [linears]
        if options.true_sequential and needs_stats:
            groups = input_groups(layer, linears, store.batch(inputs, 0, options.batch_size, device), kwargs)
        for group in groups:
            stats = {name: None for name, _ in group}
            if needs_stats:
                stats = _collect_statistics(statistics, layer, group, inputs, kwargs, options, device, store)
                if dist is not None:
                    dist.reduce_statistics(stats)  # every rank now holds the statistics of all windows
            schedule.observe(index, stats, {name: weight_matrix(m) for name, m in group})
            owners = dist.assign(group) if dist is not None else None
            solved = {}
            for name, module in group:
                if owners is not None and owners[name] != dist.rank:
                    stats[name] = None  # solved by another rank
                    continue
                full_name = f"{prefix}.{index}.{name}"
                bar.set_postfix_str(name)
                pattern = schedule.pattern_for(index, name)
                solved[name] = _solve_one(full_name, module, solve, stats[name], pattern, solver_options, post_solve)
                stats[name] = None  # free the Hessian as soon as it is used
            group_records = list(solved.values())
            if dist is not None:  # every rank needs the group's weights before the next group's statistics
                group_records = dist.share_solved(group, owners, solved, post_solve, name_prefix=f"{prefix}.{index}.")
            records.extend(group_records)
        if targets is not None:
            inputs = _tune_layer(layer, f"{prefix}.{index}", linears, inputs, targets, kwargs, post_solve, options,
                                 device, store, records[layer_start:])
        elif needs_stats and index + 1 < len(layers):
            inputs = _forward_all(layer, inputs, kwargs, options.batch_size, device, store)
        if layer_io is not None:
            layer_io.store_layer(index, layer)  # written out, memory released
        else:
            layers[index] = layer.to("cpu")
        if progress is not None:
            weights = {} if layer_io is not None else {f"{name}": weight_matrix(m).contiguous() for name, m in linears}
            extra = {"schedule": schedule.state()} if hasattr(schedule, "state") else {}
            empty = torch.empty(0)
            progress.save_layer(index, weights, records, inputs if inputs is not None else empty, extra)
            store.release(inputs)
    store.close()
    result = {"records": records, "seconds": time.time() - start_time, "resumed_from": first}
    if activations is not None:
        result["activations"] = activations
    if dist is not None:
        result["distributed"] = dist.describe()
    return result


def statistics_kind(solve, schedule, post_solve, layer_loss: bool = True) -> Optional[str]:
    """What the pruning pass collects per Linear: ``None``, ``"input_norms"`` or ``"hessian"``."""
    wanted = {statistics_needed(solve)}
    if getattr(schedule, "needs_statistics", False):
        wanted.add("hessian")
    if post_solve is not None and getattr(post_solve, "needs_statistics", True):
        wanted.add("hessian")
    if "hessian" in wanted or ("input_norms" in wanted and layer_loss):
        return "hessian"
    return "input_norms" if "input_norms" in wanted else None


def input_groups(layer, linears, batch, kwargs) -> list:
    """``linears`` split into groups of Linears that read the same input tensor, in the order a
    forward of ``layer`` on ``batch`` reaches them (Linears it never reaches form a last group)."""
    order, by_input, pending = [], {}, dict(linears)

    def hook_for(name):
        def hook(module, inputs):
            if name not in pending:  # a Linear called twice keeps its first place
                return
            source = inputs[0]
            key = (source.data_ptr(), tuple(source.shape), source.stride())
            if key not in by_input:
                by_input[key] = []
                order.append((key, source))  # keeps the tensor alive, so its address is not reused
            by_input[key].append((name, pending.pop(name)))
            if not pending:
                raise StatisticsComplete
        return hook

    handles = [module.register_forward_pre_hook(hook_for(name)) for name, module in linears]
    try:
        run_layer(layer, batch, kwargs[batch.shape[0]])
    except StatisticsComplete:
        pass
    finally:
        for handle in handles:
            handle.remove()
    groups = [by_input[key] for key, _ in order]
    if pending:
        groups.append(list(pending.items()))
    return groups


def _check_teacher_run(solve, post_solve, statistics, options, layer_io):
    """Teacher calibration needs a quantizer that reads Hessians and both activation streams in memory."""
    if post_solve is None or not getattr(post_solve, "needs_statistics", True) or statistics != "hessian":
        raise ValueError("teacher calibration needs a quantizer that reads calibration statistics (GPTQ) "
                         "after the pruning solver")
    if getattr(solve, "joint_int4", False):
        raise ValueError("teacher calibration cannot be used with the joint SparseGPT + INT4 sweep: it has no "
                         "pruned, unquantized model to calibrate against (prune first, then quantize)")
    if layer_io is not None or options.distributed is not None:
        raise ValueError("teacher calibration is not supported in streamed or distributed runs")
    if options.progress_dir or options.resume:
        raise ValueError("teacher calibration runs keep no progress folder (it holds one activation stream): "
                         "they cannot resume")
    if options.activations == "disk":
        raise ValueError("teacher calibration keeps two activation streams: use activations 'device' or 'cpu'")


def _check_scale_tuning_run(post_solve, statistics, options):
    """Scale tuning needs INT4 codes to tune, calibration inputs and a single activation stream."""
    if post_solve is None or not hasattr(post_solve, "set_scales"):
        raise ValueError("scale tuning tunes INT4 group scales: it needs a quantizer (--wbits 4)")
    if statistics is None:
        raise ValueError("scale tuning needs calibration inputs; this run collects none (use GPTQ)")
    if options.teacher or options.distributed is not None:
        raise ValueError("scale tuning cannot be combined with teacher calibration or a distributed run")


def _tune_layer(layer, layer_name, linears, inputs, targets, kwargs, quantizer, options, device, store,
                layer_records):
    """Tune the quantized layer's group scales (``pipeline.scale_tuning``), write the weights they
    give into the layer and the quantizer's results, note the outcome in the layer's report records,
    and return the layer's outputs (the next layer's inputs)."""
    codes = {name: quantizer.results[f"{layer_name}.{name}"] for name, _ in linears}
    tuned = tune_layer_scales(layer, codes, inputs, targets, kwargs, options.scale_tuning, options.batch_size,
                              device, store)
    for name, module in linears:
        W = quantizer.set_scales(f"{layer_name}.{name}", tuned.scales[name])
        set_weight_matrix(module, W)  # copied into the module's device and dtype
    for record in layer_records:
        record.update(describe_tuning(tuned))
    return tuned.outputs


def _solve_layer_with_teacher(layer, index, prefix, linears, teacher_inputs, inputs, kwargs, solve, statistics,
                              schedule, solver_options, post_solve, options, device, store, bar, last):
    """One decoder layer of a teacher run; returns ``(records, next teacher inputs, next own inputs)``
    (no next inputs after the ``last`` layer).

    The pruning solver runs on the teacher's statistics (group by group with ``true_sequential``),
    as the run without quantization does; a copy of the pruned layer is the teacher. Then every
    group's quantizer statistics are collected with the groups before it quantized, each batch
    through the teacher first (its Linears' inputs recorded) and then through the layer itself."""
    originals = {name: weight_matrix(m).clone() for name, m in linears}
    pruned, seconds = {}, {}
    groups = [linears]
    if options.true_sequential:
        groups = input_groups(layer, linears, store.batch(teacher_inputs, 0, options.batch_size, device), kwargs)
    for group in groups:
        stats = _collect_statistics(statistics, layer, group, teacher_inputs, kwargs, options, device, store)
        schedule.observe(index, stats, {name: weight_matrix(m) for name, m in group})
        for name, module in group:
            bar.set_postfix_str(f"{name} (prune)")
            t0 = time.time()
            pattern = schedule.pattern_for(index, name)
            pruned[name] = (solve(weight_matrix(module), stats[name], pattern, **solver_options), pattern)
            seconds[name] = time.time() - t0
            stats[name] = None
            set_weight_matrix(module, pruned[name][0].weight.to(weight_matrix(module).dtype))
    teacher_layer = copy.deepcopy(layer)  # holds the pruned, unquantized weights
    teacher_linears = dict(prunable_linears(teacher_layer))
    records = []
    for group in input_groups(layer, linears, store.batch(inputs, 0, options.batch_size, device), kwargs):
        stats = _collect_paired_statistics(layer, group, teacher_layer, [(n, teacher_linears[n]) for n, _ in group],
                                           teacher_inputs, inputs, kwargs, options, device, store)
        for name, module in group:
            bar.set_postfix_str(f"{name} (quantize)")
            result, pattern = pruned[name]
            record = _finish_one(f"{prefix}.{name}", module, originals[name], result, pattern, stats[name],
                                 post_solve)
            record["seconds"] += seconds[name]
            records.append(record)
            stats[name] = None
    if last:
        return records, None, None
    teacher_inputs = _forward_all(teacher_layer, teacher_inputs, kwargs, options.batch_size, device, store)
    inputs = _forward_all(layer, inputs, kwargs, options.batch_size, device, store)
    return records, teacher_inputs, inputs


def _collect_paired_statistics(layer, group, teacher_layer, teacher_group, teacher_inputs, inputs, kwargs, options,
                               device, store):
    """The group's Hessians on ``inputs`` with their cross terms against ``teacher_inputs``."""
    recorder = InputRecorder(teacher_group, stop_when_complete=True)
    collector = PairedCollector(group, device, recorder.inputs, stop_when_complete=True,
                                sink_weight=options.sink_weight, sink_cap=options.sink_cap)
    with recorder, collector:
        for start in range(0, inputs.shape[0], options.batch_size):
            recorder.new_batch()
            collector.new_batch()
            collector.teacher = recorder.inputs
            for module, stream in ((teacher_layer, teacher_inputs), (layer, inputs)):
                batch = store.batch(stream, start, options.batch_size, device)
                try:
                    run_layer(module, batch, kwargs[batch.shape[0]])
                except StatisticsComplete:  # every Linear of the group has its input
                    pass
    return collector.stats


def _collect_statistics(kind, layer, linears, inputs, kwargs, options, device, store):
    collector_class = HessianCollector if kind == "hessian" else InputNormCollector
    with collector_class(linears, device, stop_when_complete=True, sink_weight=options.sink_weight,
                         sink_cap=options.sink_cap) as collector:
        for start in range(0, inputs.shape[0], options.batch_size):
            collector.new_batch()
            batch = store.batch(inputs, start, options.batch_size, device)
            try:
                run_layer(layer, batch, kwargs[batch.shape[0]])
            except StatisticsComplete:  # every Linear has its input: the rest is not needed
                pass
    return collector.stats


def _forward_all(layer, inputs, kwargs, batch_size, device, store):
    outputs = store.empty_like(inputs)
    for start in range(0, inputs.shape[0], batch_size):
        batch = store.batch(inputs, start, batch_size, device)
        store.put(outputs, start, run_layer(layer, batch, kwargs[batch.shape[0]]))
    return outputs


def _solve_one(full_name, module, solve, stats: Optional[LayerStats], pattern, solver_options, post_solve):
    W = weight_matrix(module)
    t0 = time.time()
    result = solve(W, stats, pattern, **solver_options)
    solver_seconds = time.time() - t0
    record = _finish_one(full_name, module, W, result, pattern, stats, post_solve)
    record["seconds"] += solver_seconds
    return record


def _finish_one(full_name, module, W, result, pattern, stats: Optional[LayerStats], post_solve):
    """``post_solve`` the solver's result, write the weight into ``module`` and return the report
    record (``W``: the weight before the solver; its ``seconds`` count the post_solve only)."""
    t0 = time.time()
    W_new, extra = result.weight, {}
    if post_solve is not None:
        W_new, extra = post_solve(full_name, W_new, result, stats, original=W)
    seconds = time.time() - t0
    W_new = W_new.to(W.dtype)
    relative_error = _relative_error(W, W_new, stats)  # W is a view: measure before writing
    set_weight_matrix(module, W_new)
    zeros = int((weight_matrix(module) == 0).sum())
    record = {
        "name": full_name,
        "shape": list(W.shape),
        "target": str(pattern),
        "target_sparsity": pattern.sparsity,
        "achieved_sparsity": zeros / W.numel(),
        "pruned_fraction": int(result.pruned.sum()) / result.pruned.numel(),  # no float copy of the mask
        "loss": result.loss,
        "seconds": seconds,
    }
    record.update({k: v for k, v in result.info.items() if isinstance(v, (int, float, str, bool))})
    record.update(extra)
    if relative_error is not None:
        record["relative_error"] = relative_error
    return record


def _relative_error(W, W_new, stats: Optional[LayerStats]) -> Optional[float]:
    """``||(W - W_new) X||^2 / ||W X||^2`` on the calibration inputs: the fraction of the Linear's
    output that pruning and quantization together destroy (None without a Hessian)."""
    if stats is None or stats.H is None:
        return None
    energy = output_energy(W, stats.H)
    return reconstruction_loss(W, W_new, stats.H) / energy if energy > 0 else 0.0


def _restore_layers(layers, weights_by_layer):
    for index, weights in weights_by_layer.items():
        modules = dict(prunable_linears(layers[index]))
        for name, W in weights.items():
            set_weight_matrix(modules[name], W.to(weight_matrix(modules[name]).dtype))


def _tensor_digest(tokens):
    if tokens is None:
        return None
    return hashlib.sha256(tokens.cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (int, float, str, bool)) or obj is None:
        return obj
    return repr(obj)
