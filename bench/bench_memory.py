"""Peak memory of pruning: in memory vs streamed layers vs streamed with activations on disk.

Every case runs in a fresh Python process that reports its peak resident set size (``getrusage``
``ru_maxrss``), its resident size right after its imports (the fixed cost of torch, transformers
and the pyprune extension, whatever the model) and its wall time. Results are merged by case name
into ``bench/results/memory.json`` and ``bench/results/memory.md``, so the parts can run separately.

Parts
-----
``smollm2``: SmolLM2-135M (the safetensors copy in ``~/.cache/pyprune/smollm2-135m``, float32),
SparseGPT 50 %, C4 calibration (default 8 x 512, a reduced P1): in memory (load, prune, save, as
the CLI does) vs streamed (``--activations cpu``) vs streamed (``--activations disk``); the three
outputs are compared tensor by tensor.

``synthetic``: a LLaMA-architecture model with random weights, by default open_llama_3b's shape
(3.43 B parameters, 6.9 GB of fp16 shards), written to ``--workdir`` (default ``/tmp``), streamed
with wanda on 8 x 512 random tokens (the statistics, activations and one layer are what memory is
spent on), then deleted. Layers are computed in bfloat16 (``--dtype``): CPU float16 matmuls are
~250x slower than bfloat16 ones in this torch build. ``--max-layers K`` stops after K layers (every
layer has the same shapes, so the per-layer peak is reached in the first one; the run can be
finished later with ``--resume``); ``--method magnitude`` streams all layers without calibration.

``gloo``: SmolLM2-135M pruned with SparseGPT 50 % by one process and by two CPU processes (gloo,
calibration windows split, Hessians all-reduced, Linears solved on both ranks), then both
evaluated on the first ``--eval-windows`` WikiText-2 test windows of 2048 tokens: perplexities,
mask agreement and the largest weight difference. (Expensive on CPU: a P1-sized prune per run.)

Usage (from the repository root)::

    OMP_NUM_THREADS=1 python bench/bench_memory.py smollm2 [--nsamples 8 --seqlen 512]
    OMP_NUM_THREADS=1 python bench/bench_memory.py synthetic --method wanda --max-layers 2
    OMP_NUM_THREADS=1 python bench/bench_memory.py synthetic --method magnitude
    OMP_NUM_THREADS=1 python bench/bench_memory.py gloo --nsamples 32 --seqlen 2048 --eval-windows 40
"""
import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
SMOLLM2 = os.path.join(os.path.expanduser("~"), ".cache", "pyprune", "smollm2-135m")
DATA = os.environ.get("PYPRUNE_DATA_DIR", os.path.join(REPO, "..", "shared", "data"))

# open_llama_3b's shape: 26 layers of 3200 / 8640, 32 heads, vocab 32000 -> 3.43 B parameters.
SYNTHETIC = dict(vocab_size=32000, hidden_size=3200, intermediate_size=8640, num_hidden_layers=26,
                 num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=2048,
                 tie_word_embeddings=False)


# -- the measured process ---------------------------------------------------------------------

def worker(spec: dict) -> dict:
    """Runs one case in this (fresh) process; returns the measurements."""
    import resource

    import psutil
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from transformers import AutoModelForCausalLM, LlamaForCausalLM  # noqa: F401

    from pyprune.pipeline import RunOptions, prune_model
    from pyprune.pipeline.streaming import prune_streamed
    from pyprune.schedule import UniformSchedule
    from pyprune.solvers import SparsityPattern

    after_imports = psutil.Process().memory_info().rss
    t0 = time.time()
    dtype = getattr(torch, spec["dtype"])
    tokens = None
    if spec["method"] != "magnitude":
        if spec.get("tokens_file"):  # tokenized by the parent: tokenizing is no part of what is measured
            tokens = torch.load(spec["tokens_file"])
        else:
            g = torch.Generator().manual_seed(0)
            tokens = torch.randint(0, spec["vocab_size"], (spec["nsamples"], spec["seqlen"]), generator=g)
    calibration_seconds = time.time() - t0
    rss_before = psutil.Process().memory_info().rss
    schedule = UniformSchedule(SparsityPattern.parse(spec["pattern"]))
    options = RunOptions(device="cpu", activations=spec["activations"], activations_dir=spec.get("activations_dir"),
                         batch_size=1, show_progress=False, progress_dir=spec.get("progress_dir"),
                         resume=spec.get("resume", False), layer_loss=spec.get("layer_loss", True))
    t1 = time.time()
    if spec["mode"] == "in-memory":
        model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=dtype)
        model.eval()
        model.config.use_cache = False
        result = prune_model(model, tokens, spec["method"], schedule, {}, options)
        model.save_pretrained(spec["out"])
        complete = True
    else:
        result = prune_streamed(spec["model_dir"], spec["out"], tokens, spec["method"], schedule, {}, options,
                                dtype=dtype, max_layers=spec.get("max_layers"))
        complete = result["complete"]
    seconds = time.time() - t1
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "rss_after_imports": after_imports,
        "peak_rss": peak,
        "peak_above_imports": peak - after_imports,
        "prune_seconds": seconds,
        "calibration_seconds": calibration_seconds,
        "rss_before_pruning": rss_before,
        "layers_done": len({r["name"].rsplit(".", 2)[0] for r in result.get("records", [])}) if complete else
        result["next_layer"],
        "complete": complete,
        "activations": (result.get("activations") or {}).get("estimate"),
    }


def run_case(spec: dict) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.time()
    done = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)],
                          env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"case {spec['name']} failed:\n{done.stderr[-4000:]}")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    out["wall_seconds"] = time.time() - t0
    return out


# -- parts --------------------------------------------------------------------------------------

def folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".safetensors"))


def compare_outputs(a: str, b: str) -> float:
    """Largest absolute difference between two checkpoints' tensors (same names)."""
    from pyprune.pipeline.streaming import CheckpointIndex

    ia, ib = CheckpointIndex(a), CheckpointIndex(b)
    if set(ia.entries) != set(ib.entries):
        raise AssertionError(f"{a} and {b} hold different tensors")
    worst = 0.0
    for key in ia.entries:
        worst = max(worst, float((ia.read(key).float() - ib.read(key).float()).abs().max()))
    return worst


def part_smollm2(args) -> dict:
    if not os.path.isfile(os.path.join(SMOLLM2, "config.json")):
        raise SystemExit(f"{SMOLLM2} not found: run `pyprune prune smollm2-135m ...` once to create the cached copy")
    work = tempfile.mkdtemp(prefix="pyprune-bench-memory-", dir=args.workdir)
    size = folder_bytes(SMOLLM2)
    import torch
    from transformers import AutoTokenizer

    from pyprune.data import calibration_tokens

    tokens_file = os.path.join(work, "tokens.pt")
    torch.save(calibration_tokens(AutoTokenizer.from_pretrained(SMOLLM2), "c4", args.nsamples, args.seqlen, 0,
                                  os.path.abspath(DATA)), tokens_file)
    base = dict(model_dir=SMOLLM2, method=args.method or "sparsegpt", pattern="0.5", nsamples=args.nsamples,
                seqlen=args.seqlen, calibration="c4", tokens_file=tokens_file, dtype="float32")
    cases = {}
    try:
        for mode, activations in (("in-memory", "cpu"), ("streamed", "cpu"), ("streamed", "disk")):
            name = f"smollm2-135m {mode}" + (" + disk activations" if activations == "disk" else "")
            spec = dict(base, name=name, mode=mode, activations=activations, out=os.path.join(work, name.replace(" ", "_")),
                        activations_dir=os.path.join(work, "activations"))
            print(f"running {name} ...", flush=True)
            cases[name] = dict(run_case(spec), model="smollm2-135m (float32)", size_on_disk=size,
                               calibration=f"c4 {args.nsamples}x{args.seqlen}", method=f"{base['method']} 50%",
                               storage=activations, mode=mode)
            print(json.dumps(cases[name]), flush=True)
        names = list(cases)
        reference = os.path.join(work, names[0].replace(" ", "_"))
        for name in names[1:]:
            cases[name]["max_abs_diff_vs_in_memory"] = compare_outputs(reference, os.path.join(work, name.replace(" ", "_")))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return cases


def random_like_weights(shape, dtype, generator, block: int = 1 << 20):
    """Values with std 0.02: one random block of ``block`` numbers tiled over the tensor (the
    values do not matter for a memory benchmark; drawing billions of normals would dominate it)."""
    import torch

    numel = 1
    for s in shape:
        numel *= s
    base = torch.randn(min(block, numel), generator=generator).mul_(0.02).to(dtype)
    out = torch.empty(numel, dtype=dtype)
    for start in range(0, numel, base.numel()):
        n = min(base.numel(), numel - start)
        out[start:start + n] = base[:n]
    return out.view(shape)


def write_synthetic(folder: str, dtype_name: str = "float16") -> int:
    """Random LLaMA weights (std 0.02, norms 1) as one shard per decoder layer + one for the rest."""
    import torch
    from transformers import LlamaConfig

    from pyprune.pipeline.streaming import INDEX_NAME, load_skeleton, write_safetensors

    dtype = getattr(torch, dtype_name)
    config = LlamaConfig(**SYNTHETIC)
    config.dtype = dtype_name
    os.makedirs(folder, exist_ok=True)
    config.save_pretrained(folder)
    shapes = {k: tuple(v.shape) for k, v in load_skeleton(folder).state_dict().items()}
    layers = SYNTHETIC["num_hidden_layers"]
    groups = [[k for k in shapes if k.startswith(f"model.layers.{i}.")] for i in range(layers)]
    groups.append([k for k in shapes if not k.startswith("model.layers.")])
    g = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for i, keys in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {k: torch.ones(shapes[k], dtype=dtype) if len(shapes[k]) == 1
                   else random_like_weights(shapes[k], dtype, g) for k in keys}
        write_safetensors(os.path.join(folder, name), tensors, {k: dtype for k in keys})
        total += sum(t.numel() for t in tensors.values())
        weight_map.update({k: name for k in keys})
        del tensors
    with open(os.path.join(folder, INDEX_NAME), "w") as f:
        json.dump({"metadata": {"total_size": folder_bytes(folder)}, "weight_map": weight_map}, f)
    return total


def part_synthetic(args) -> dict:
    folder = os.path.join(args.workdir, "pyprune-synthetic-llama-3b")
    method = args.method or "wanda"
    try:
        if not os.path.isfile(os.path.join(folder, "model.safetensors.index.json")):
            t0 = time.time()
            print(f"writing the synthetic model to {folder} ...", flush=True)
            params = run_generator(folder)
            print(f"  {params / 1e9:.2f} B parameters in {time.time() - t0:.0f} s", flush=True)
        size = folder_bytes(folder)
        params = size // 2
        out = folder + "-pruned"
        name = f"synthetic llama {params / 1e9:.1f}B streamed {method}" + (
            f", first {args.max_layers} layers" if args.max_layers else "") + f", {args.activations} activations" + (
            "" if args.layer_loss or method != "wanda" else ", no layer loss (input norms only)")
        spec = dict(name=name, mode="streamed", model_dir=folder, out=out, method=method, pattern="0.5",
                    nsamples=args.nsamples, seqlen=args.seqlen, calibration="random",
                    vocab_size=SYNTHETIC["vocab_size"], dtype=args.dtype, activations=args.activations,
                    activations_dir=os.path.join(args.workdir, "pyprune-activations"), max_layers=args.max_layers,
                    layer_loss=args.layer_loss)
        print(f"running {name} ...", flush=True)
        case = dict(run_case(spec), model=f"synthetic LLaMA {params / 1e9:.2f} B (fp16 shards, {args.dtype} compute)",
                    size_on_disk=size, calibration=f"random {args.nsamples}x{args.seqlen}" if method != "magnitude"
                    else "none", method=f"{method} 50%", storage=args.activations, mode="streamed")
        case["output_bytes"] = folder_bytes(out) if os.path.isdir(out) else 0
        shutil.rmtree(out, ignore_errors=True)
        print(json.dumps(case), flush=True)
        return {name: case}
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
            shutil.rmtree(folder + "-pruned", ignore_errors=True)


def run_generator(folder: str) -> int:
    """Writes the synthetic model in a child process (this one stays small)."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, os.path.abspath(__file__), "--generate", folder], env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-4000:])
    return int(done.stdout.strip().splitlines()[-1])


def gloo_worker(rank: int, world: int, folder: str, spec: dict):
    """One rank of the gloo comparison (``world == 1``: the single-process reference)."""
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pyprune.data import calibration_tokens
    from pyprune.pipeline import RunOptions, prune_model
    from pyprune.pipeline.distributed import DistributedPruning
    from pyprune.schedule import UniformSchedule
    from pyprune.solvers import SparsityPattern

    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world)
    try:
        model = AutoModelForCausalLM.from_pretrained(SMOLLM2, dtype=torch.float32)
        model.eval()
        model.config.use_cache = False
        tokenizer = AutoTokenizer.from_pretrained(SMOLLM2)
        tokens = calibration_tokens(tokenizer, "c4", spec["nsamples"], spec["seqlen"], 0, spec["data_dir"])
        t0 = time.time()
        prune_model(model, tokens, "sparsegpt", UniformSchedule(SparsityPattern(sparsity=0.5)), {},
                    RunOptions(show_progress=False, distributed=DistributedPruning() if world > 1 else None))
        if rank == 0:
            model.save_pretrained(os.path.join(folder, f"world{world}"))
            with open(os.path.join(folder, f"world{world}.json"), "w") as f:
                json.dump({"prune_seconds": time.time() - t0}, f)
    finally:
        if world > 1:
            dist.destroy_process_group()


def part_gloo(args) -> dict:
    import torch
    import torch.multiprocessing as mp
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pyprune.data import evaluation_tokens
    from pyprune.eval import perplexity

    work = tempfile.mkdtemp(prefix="pyprune-bench-gloo-", dir=args.workdir)
    spec = {"nsamples": args.nsamples, "seqlen": args.seqlen, "data_dir": os.path.abspath(DATA)}
    try:
        runs = {}
        for world in (1, 2):
            print(f"pruning with {world} process(es) ...", flush=True)
            mp.start_processes(gloo_worker, args=(world, work, spec), nprocs=world, join=True, start_method="spawn")
            with open(os.path.join(work, f"world{world}.json")) as f:
                runs[world] = json.load(f)
        models = {w: AutoModelForCausalLM.from_pretrained(os.path.join(work, f"world{w}"), dtype=torch.float32)
                  for w in (1, 2)}
        stream = evaluation_tokens(AutoTokenizer.from_pretrained(SMOLLM2), os.path.abspath(DATA))
        for w, model in models.items():
            model.eval()
            runs[w].update(perplexity(model, stream, 2048, args.eval_windows, "cpu", progress=False))
        a, b = models[1].state_dict(), models[2].state_dict()
        linear = [k for k in a if ".layers." in k and k.endswith("proj.weight")]
        same = sum(int(torch.equal(a[k] == 0, b[k] == 0)) for k in linear)
        differing = sum(int(((a[k] == 0) != (b[k] == 0)).sum()) for k in linear)
        worst = max(float(((a[k] - b[k]).norm() / a[k].norm()).item()) for k in linear)
        result = {"calibration": f"c4 {args.nsamples}x{args.seqlen}", "eval_windows": args.eval_windows,
                  "single": runs[1], "gloo_2": runs[2], "linears": len(linear), "identical_masks": same,
                  "differing_mask_entries": differing, "max_relative_weight_difference": worst}
        print(json.dumps(result), flush=True)
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


# -- results ------------------------------------------------------------------------------------

def gib(n) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def save(cases: dict, gloo: dict = None):
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, "memory.json")
    data = {"cases": {}}
    if os.path.isfile(path):
        with open(path) as f:
            data = json.load(f)
    data["cases"].update(cases)
    if gloo is not None:
        data["gloo"] = gloo
    import psutil
    import torch
    import transformers

    data["machine"] = {"cpus": os.cpu_count(), "ram_bytes": psutil.virtual_memory().total,
                       "platform": platform.platform(), "torch": torch.__version__,
                       "transformers": transformers.__version__,
                       "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
    lines = [
        "# Peak memory of pruning (bench/bench_memory.py)",
        "",
        "Peak RSS = `ru_maxrss` of the process running the case; 'after imports' = its RSS once torch, "
        "transformers and pyprune are imported (a fixed cost); 'peak / size' = peak RSS over the size of "
        "the checkpoint on disk. CPU only, OMP_NUM_THREADS=" + str(os.environ.get("OMP_NUM_THREADS")) + ".",
        "",
        "| case | size on disk | calibration | activations | peak RSS | after imports | peak above imports "
        "| peak / size | (above imports) / size | prune s | layers |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, c in data["cases"].items():
        lines.append(
            f"| {name} | {gib(c['size_on_disk'])} | {c['calibration']} | {c['storage']} | {gib(c['peak_rss'])} "
            f"| {gib(c['rss_after_imports'])} | {gib(c['peak_above_imports'])} "
            f"| {100 * c['peak_rss'] / c['size_on_disk']:.1f}% | {100 * c['peak_above_imports'] / c['size_on_disk']:.1f}% "
            f"| {c['prune_seconds']:.0f} | {c['layers_done']}{'' if c['complete'] else ' (paused)'} |")
    diffs = {n: c["max_abs_diff_vs_in_memory"] for n, c in data["cases"].items() if "max_abs_diff_vs_in_memory" in c}
    if diffs:
        lines += ["", "Streamed outputs vs the in-memory output, largest absolute weight difference: "
                  + ", ".join(f"{n}: {d:g}" for n, d in diffs.items())]
    lines += ["", "Notes:", "",
              "- 'after imports' (0.74 to 0.96 GiB across runs) is torch's CUDA build (~0.69 GiB, mostly shared library pages) "
              "plus transformers; it does not grow with the model, so 'peak above imports' is what streaming "
              "controls.",
              "- What the streamed peak is made of: one decoder layer in the compute dtype, one tensor being "
              "converted on load or write, the calibration activations (two copies, or two batches with disk "
              "activations), the layer's statistics and the solver's temporaries. Mask selection works on "
              "chunks of rows (a radix select for whole-matrix thresholds), so a 3200 x 8640 bf16 weight "
              "costs a few times its own size, not the ~0.7 GiB a flattened top-k took; streamed runs fix "
              "glibc's mmap threshold so those temporaries are returned to the OS when freed.",
              "- wanda with the layer loss (the default in memory) keeps each Linear's float32 Hessian "
              "(0.3 GiB for the 8640-wide down_proj alone) only to report its reconstruction loss; "
              "`--no-layer-loss` (the default with `--stream`) keeps the input norms, all wanda reads.",
              "- Seconds are loose: the 3.4 B magnitude run (649 s) shared the 2 cores with two other jobs; "
              "alone, before the mmap threshold change, it took 284 s.",
              "- Synthetic model: random weights (a random block tiled over each tensor), written as fp16 shards "
              "to /tmp and deleted afterwards; layers computed in bfloat16. Every layer has the same shapes, so "
              "the wanda run stopped after its first layers has already reached the per-layer peak; the "
              "magnitude run streams and writes all 26 layers and the embeddings/head."]
    g = data.get("gloo")
    if g:
        lines += ["", f"## One process vs two gloo processes (SmolLM2-135M, SparseGPT 50 %, {g['calibration']})", "",
                  "| run | WikiText-2 ppl | windows | prune s |", "| --- | --- | --- | --- |",
                  f"| 1 process | {g['single']['ppl']:.4f} | {g['single']['windows']} | {g['single']['prune_seconds']:.0f} |",
                  f"| 2 processes (gloo) | {g['gloo_2']['ppl']:.4f} | {g['gloo_2']['windows']} "
                  f"| {g['gloo_2']['prune_seconds']:.0f} |", "",
                  f"Masks identical in {g['identical_masks']} of {g['linears']} Linears "
                  f"({g['differing_mask_entries']} entries differ); largest relative weight difference "
                  f"{g['max_relative_weight_difference']:.2e}."]
    with open(os.path.join(RESULTS, "memory.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", nargs="?", choices=["smollm2", "synthetic", "gloo", "all"])
    p.add_argument("--method", default=None, help="smollm2: sparsegpt (default); synthetic: wanda (default) or magnitude")
    p.add_argument("--nsamples", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--activations", default="cpu", choices=["device", "cpu", "disk"], help="synthetic part")
    p.add_argument("--dtype", default="bfloat16", help="synthetic part: compute dtype")
    p.add_argument("--max-layers", type=int, default=None, help="synthetic part: stop after this many layers")
    p.add_argument("--no-layer-loss", dest="layer_loss", action="store_false",
                   help="synthetic part: wanda collects input norms only, no Hessians (pyprune prune --no-layer-loss)")
    p.add_argument("--workdir", default=tempfile.gettempdir(), help="where models and outputs are written")
    p.add_argument("--keep", action="store_true", help="synthetic part: keep the generated model")
    p.add_argument("--eval-windows", type=int, default=40, help="gloo part: WikiText-2 windows of 2048 tokens")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--generate", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    if args.generate:
        print(write_synthetic(args.generate))
        return
    if args.part is None:
        p.error("choose a part: smollm2, synthetic or all")
    cases = {}
    if args.part in ("smollm2", "all"):
        cases.update(part_smollm2(args))
    if args.part in ("synthetic", "all"):
        cases.update(part_synthetic(args))
    gloo = part_gloo(args) if args.part in ("gloo", "all") else None
    save(cases, gloo)


if __name__ == "__main__":
    main()
