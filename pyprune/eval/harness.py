"""Zero-shot accuracy through EleutherAI's lm-evaluation-harness (``lm-eval`` 0.4.x), unforked.

The in-memory model object (dense, pruned or with compressed modules swapped in) and its tokenizer
are handed to the harness's Hugging Face wrapper, ``HFLM(pretrained=model, tokenizer=tokenizer)``,
so nothing is reloaded from disk, and ``lm_eval.simple_evaluate`` does the scoring. Only the
harness's public API is used: ``HFLM``, ``TaskManager`` and ``simple_evaluate``.

``lm-eval`` is the optional extra ``pyprune[eval]``; everything here imports it lazily and fails
early, before any model work, when it is missing or a task name is unknown. Local tasks (a task
YAML whose ``dataset_kwargs.data_files`` point at local JSON) are found through ``task_dirs``.
Without network, the Hugging Face offline switches are turned on for the run, so a task whose
dataset is not in the local cache fails at once with an error naming that dataset instead of
retrying connections.
"""
from __future__ import annotations

import difflib
import math
import os
import re
import socket
import threading
import time
from contextlib import contextmanager
from functools import lru_cache
from urllib.parse import urlparse

INSTALL_HINT = "pip install 'pyprune[eval]'"
LIST_HINT = (
    "list the tasks the harness knows with `lm-eval ls tasks` "
    "(add `--include_path DIR` to include a folder of local task YAMLs)"
)
# The metrics reported per task, in table order.
METRICS = ("acc", "acc_norm")


class HarnessNotInstalled(ImportError):
    """``lm-eval`` is not installed."""


class UnknownTaskError(ValueError):
    """A task name the harness does not know."""


class TaskDataError(RuntimeError):
    """A task's dataset could not be loaded (typically: not cached and no network)."""


def require_harness():
    """Import and return the ``lm_eval`` module, or fail with the install hint."""
    try:
        import lm_eval
    except ImportError as e:
        raise HarnessNotInstalled(
            f"zero-shot tasks need lm-evaluation-harness (lm-eval 0.4.x), which is not installed: "
            f"{INSTALL_HINT}  ({e})"
        ) from e
    return lm_eval


def harness_version() -> str | None:
    """The installed ``lm-eval`` version, or None."""
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:  # pragma: no cover
        return None
    try:
        return version("lm_eval")
    except PackageNotFoundError:
        return None


def parse_tasks(tasks) -> list[str]:
    """``"boolq,rte"`` or ``["boolq", "rte"]`` -> ``["boolq", "rte"]`` (order kept, no repeats)."""
    if isinstance(tasks, str):
        tasks = tasks.split(",")
    names = []
    for name in tasks:
        if not isinstance(name, str):
            raise TypeError(f"task names must be strings, got {name!r}")
        name = name.strip()
        if name and name not in names:
            names.append(name)
    if not names:
        raise ValueError(f"no task names given (tasks={tasks!r}); e.g. tasks=['arc_easy', 'boolq']")
    return names


def _check_dirs(task_dirs) -> list[str]:
    if isinstance(task_dirs, (str, os.PathLike)):
        task_dirs = [task_dirs]
    dirs = [os.path.abspath(os.fspath(d)) for d in task_dirs]
    for d in dirs:
        if not os.path.isdir(d):
            raise FileNotFoundError(f"task folder not found: {d} (task_dirs must be folders of task YAMLs)")
    return dirs


def resolve_tasks(tasks, task_dirs=()):
    """Check ``tasks`` against the harness and return ``(names, task_manager)``.

    Cheap enough to call before loading or pruning a model: a task folder alone is indexed in
    milliseconds, and the harness's own ~15k task YAMLs (several seconds, then cached for the
    process) are indexed only when a name is not found in ``task_dirs``. Unknown names raise
    :class:`UnknownTaskError`.
    """
    require_harness()
    from lm_eval.tasks import TaskManager

    names = parse_tasks(tasks)
    dirs = _check_dirs(task_dirs)
    # Names may also be paths of task YAML files, which the harness accepts directly.
    wanted = [n for n in names if not os.path.isfile(n)]
    if dirs:
        local = TaskManager(include_path=dirs, include_defaults=False)
        if set(wanted) <= set(local.all_tasks):
            return names, local
    manager = _full_task_manager(tuple(dirs))
    known = set(manager.all_tasks)
    unknown = [n for n in wanted if n not in known]
    if unknown:
        lines = []
        for n in unknown:
            close = difflib.get_close_matches(n, manager.all_tasks, n=3)
            lines.append(f"{n!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
        where = f" in the harness's tasks or in {dirs}" if dirs else " among the harness's tasks"
        raise UnknownTaskError(
            f"lm-eval {harness_version()} does not know task {', '.join(lines)}: not registered{where}. "
            f"To see what is available, {LIST_HINT}."
        )
    return names, manager


@lru_cache(maxsize=4)
def _full_task_manager(dirs: tuple):
    """The harness's task index plus ``dirs``; kept for the process because building it parses
    every task YAML the harness ships (seconds), and a CLI run checks names before the model loads
    and again when it evaluates."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(dirs) or None)


# ------------------------------------------------------------------------------------ offline


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _hub_host() -> tuple[str, int]:
    try:
        from huggingface_hub import constants

        endpoint = constants.ENDPOINT
    except Exception:  # old huggingface_hub: fall back to the public hub
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    url = urlparse(endpoint)
    return url.hostname or "huggingface.co", url.port or (443 if url.scheme != "http" else 80)


@lru_cache(maxsize=None)
def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the Hugging Face Hub opens within ``timeout`` seconds.

    The probe runs in a daemon thread because name resolution ignores socket timeouts; a stuck
    resolver therefore costs ``timeout`` seconds, not a hang. Cached for the process.
    """
    host, port = _hub_host()
    result = []

    def probe():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(result and result[0])


def decide_offline(offline: bool | None = None) -> bool:
    """``offline`` if given; else True when HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set or the Hub
    cannot be reached."""
    if offline is not None:
        return bool(offline)
    if _env_true("HF_HUB_OFFLINE") or _env_true("HF_DATASETS_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE"):
        return True
    return not hub_reachable()


@contextmanager
def _offline_switches(enabled: bool):
    """Turn the Hugging Face offline mode on for the duration of a run, then restore it.

    The libraries read HF_HUB_OFFLINE / HF_DATASETS_OFFLINE once, at import, so besides the
    environment the already-imported flags are set too.
    """
    if not enabled:
        yield
        return
    saved_env = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    saved_attrs = []
    try:
        import datasets.config as ds_config
        import huggingface_hub.constants as hub_constants

        targets = [(hub_constants, "HF_HUB_OFFLINE"), (ds_config, "HF_HUB_OFFLINE"),
                   (ds_config, "HF_DATASETS_OFFLINE")]
    except ImportError:
        targets = []
    try:
        for k in saved_env:
            os.environ[k] = "1"
        for module, attr in targets:
            if hasattr(module, attr):
                saved_attrs.append((module, attr, getattr(module, attr)))
                setattr(module, attr, True)
        yield
    finally:
        for module, attr, value in saved_attrs:
            setattr(module, attr, value)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _data_error(err: Exception, names: list[str], offline: bool) -> TaskDataError:
    # datasets quotes the name: "Couldn't reach 'org/name' on the Hub", "Dataset 'org/name' doesn't
    # exist", "Unable to find '/path'"; skip apostrophes inside words.
    quoted = re.findall(r"(?:^|\s)'([^'\s]+)'", str(err))
    dataset = quoted[0] if quoted else None
    what = f"dataset {dataset!r}" if dataset else "its dataset"
    if dataset and os.path.isabs(dataset) and not os.path.exists(dataset):
        why = f"the local data file {dataset!r} named in the task YAML does not exist"
    elif offline:
        why = (
            f"there is no network (or HF offline mode is on) and {what} is not in the local "
            f"Hugging Face datasets cache. Run the task once with network to cache it, or write "
            f"a task YAML whose dataset_kwargs.data_files point at local JSON and pass its folder "
            f"in task_dirs"
        )
    else:
        why = f"{what} could not be loaded"
    return TaskDataError(f"task(s) {', '.join(names)}: {why}. Original error: {type(err).__name__}: {err}")


# --------------------------------------------------------------------------------- evaluation


def _check_limit(limit):
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, (int, float)):
        raise TypeError(f"limit={limit!r}: use a positive integer (items per task) or a fraction in (0, 1]")
    if isinstance(limit, float) and not limit.is_integer():
        if not 0 < limit <= 1:
            raise ValueError(f"limit={limit}: a fractional limit must be in (0, 1]")
        return limit
    if limit < 1:
        raise ValueError(f"limit={limit}: must be >= 1 (items per task)")
    return int(limit)


def _check_batch_size(batch_size):
    if batch_size == "auto":
        return batch_size
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}: use a positive integer or 'auto'")
    return batch_size


def _number(value):
    """The harness reports 'N/A' or NaN for a missing stderr; keep numbers only."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _metric(row: dict, metric: str):
    """``row['acc,none']`` (the unfiltered score) or, failing that, the first ``acc,<filter>``."""
    keys = [f"{metric},none"] + sorted(k for k in row if k.startswith(f"{metric},"))
    for key in keys:
        if key in row and _number(row[key]) is not None:
            filt = key.split(",", 1)[1]
            return _number(row[key]), _number(row.get(f"{metric}_stderr,{filt}"))
    return None, None


def summarize(results: dict) -> dict:
    """Per-task acc / acc_norm (with stderr) and their means over leaf tasks, from the dict
    ``lm_eval.simple_evaluate`` returns."""
    groups = {g for g, subtasks in (results.get("group_subtasks") or {}).items() if subtasks}
    n_samples = results.get("n-samples") or {}
    tasks = {}
    for name, row in results["results"].items():
        entry = {}
        for metric in METRICS:
            value, stderr = _metric(row, metric)
            if value is not None:
                entry[metric] = value
                entry[f"{metric}_stderr"] = stderr
        if not entry:
            continue  # a task without accuracy metrics (e.g. perplexity-style): not summarized
        entry["n"] = (n_samples.get(name) or {}).get("effective", row.get("sample_len"))
        entry["group"] = name in groups
        tasks[name] = entry
    leaves = [t for t in tasks.values() if not t["group"]]
    summary = {"tasks": tasks}
    for metric in METRICS:
        values = [t[metric] for t in leaves if metric in t]
        summary[f"mean_{metric}"] = sum(values) / len(values) if values else None
    return summary


def evaluate_tasks(
    model,
    tokenizer,
    tasks,
    *,
    limit=None,
    batch_size=1,
    task_dirs=(),
    device=None,
    num_fewshot: int | None = 0,
    offline: bool | None = None,
    bootstrap_iters: int = 1000,
    seed: int = 0,
    max_length: int | None = None,
) -> dict:
    """Zero-shot accuracy of the in-memory ``model`` on lm-eval ``tasks``.

    ``model`` is a Hugging Face causal LM object (pruned, or with compressed modules swapped in)
    and ``tokenizer`` its tokenizer; both go to ``HFLM`` as objects. ``tasks``: names (a list, or
    one comma-separated string) of harness tasks or of tasks defined in ``task_dirs``.
    ``limit``: items per task (int) or fraction. ``device``: if given, the model is moved there
    first (the harness runs a given model where it is). ``num_fewshot``: 0 = zero-shot; None =
    each task's own default. ``offline``: None = detect (env switches, else a quick Hub probe).
    ``bootstrap_iters``: for the harness's stderr (acc's stderr is closed-form; 0 disables all).

    Returns a JSON-serializable dict: ``tasks`` (per task: acc, acc_stderr, acc_norm and
    acc_norm_stderr where the harness gives them, n, group), ``mean_acc``, ``mean_acc_norm``
    (over leaf tasks), ``harness``/``harness_version``, the settings, ``offline`` and ``seconds``.
    """
    require_harness()  # before anything else, so a missing extra is the first thing reported
    limit = _check_limit(limit)
    batch_size = _check_batch_size(batch_size)
    if num_fewshot is not None and (not isinstance(num_fewshot, int) or num_fewshot < 0):
        raise ValueError(f"num_fewshot={num_fewshot!r}: use an integer >= 0 or None")
    names, manager = resolve_tasks(tasks, task_dirs)
    if isinstance(model, (str, os.PathLike)) or not hasattr(model, "config"):
        raise TypeError(f"model must be a loaded Hugging Face causal LM object, got {model!r}; "
                        f"load it first (pyprune.models.load_model) so the harness scores it in memory")
    if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
        raise TypeError(f"tokenizer must be a loaded tokenizer object, got {tokenizer!r}")

    import lm_eval
    from lm_eval.models.huggingface import HFLM

    if device is not None:
        model.to(device)
    was_training = model.training
    model.eval()
    is_offline = decide_offline(offline)
    start = time.perf_counter()
    try:
        with _offline_switches(is_offline):
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
            try:
                results = lm_eval.simple_evaluate(
                    model=lm,
                    tasks=names,
                    num_fewshot=num_fewshot,
                    limit=limit,
                    task_manager=manager,
                    bootstrap_iters=bootstrap_iters,
                    log_samples=False,
                    random_seed=seed,
                    numpy_random_seed=seed,
                    torch_random_seed=seed,
                    fewshot_random_seed=seed,
                )
            except (ConnectionError, FileNotFoundError) as e:
                # Task data is loaded before any scoring, so this is the dataset, not the model.
                raise _data_error(e, names, is_offline) from e
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - start

    summary = summarize(results)
    if not summary["tasks"]:
        raise RuntimeError(f"lm-eval returned no acc/acc_norm for task(s) {', '.join(names)}; "
                           f"only multiple-choice style tasks are summarized here")
    return {
        "harness": "lm-eval",
        "harness_version": results.get("lm_eval_version") or harness_version(),
        "requested_tasks": names,
        **summary,
        "num_fewshot": num_fewshot,
        "limit": limit,
        "batch_size": batch_size,
        "task_dirs": _check_dirs(task_dirs),
        "offline": is_offline,
        "seconds": seconds,
    }


# ------------------------------------------------------------------------------------- tables


def _fmt(value, stderr=None) -> str:
    if value is None:
        return "-"
    text = f"{100 * value:.2f}"
    return text + (f" ± {100 * stderr:.2f}" if stderr is not None else "")


def format_table(reports, *, stderr: bool = True) -> str:
    """A Markdown table (readable in a terminal) of accuracies in percent.

    ``reports``: one :func:`evaluate_tasks` result, or ``{label: result}`` to put several models
    side by side (one row per model, one column per task, then the mean acc).
    """
    if "tasks" in reports and "harness" in reports:
        reports = {"model": reports}
    if not reports:
        raise ValueError("format_table needs at least one report")
    task_names = []
    for rep in reports.values():
        for name, entry in rep["tasks"].items():
            if not entry["group"] and name not in task_names:
                task_names.append(name)
    has_norm = any("acc_norm" in rep["tasks"].get(t, {}) for rep in reports.values() for t in task_names)
    header = ["model"]
    for t in task_names:
        header.append(f"{t} acc")
        if has_norm:
            header.append(f"{t} acc_norm")
    header += ["mean acc"] + (["mean acc_norm"] if has_norm else [])
    rows = []
    for label, rep in reports.items():
        row = [str(label)]
        for t in task_names:
            entry = rep["tasks"].get(t, {})
            row.append(_fmt(entry.get("acc"), entry.get("acc_stderr") if stderr else None))
            if has_norm:
                row.append(_fmt(entry.get("acc_norm"), entry.get("acc_norm_stderr") if stderr else None))
        row.append(_fmt(rep.get("mean_acc")))
        if has_norm:
            row.append(_fmt(rep.get("mean_acc_norm")))
        rows.append(row)
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in [header] + rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    versions = sorted({rep.get("harness_version") or "?" for rep in reports.values()})
    return "\n".join(lines) + f"\n\nAccuracy in %, lm-eval {', '.join(versions)}."
