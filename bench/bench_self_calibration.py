"""Generate a self-calibration set with the library defaults, save it, and describe it.

Loads the model (default: the built-in ``smollm2-135m``), samples ``--nsamples`` x ``--seqlen``
tokens with ``pyprune.data.self_calibration.generate_calibration``, saves them with
``save_calibration`` (reload with ``load_calibration`` or ``pyprune prune --calib FILE``), and
writes the generation time and simple text statistics: EOS count, distinct 4-gram fraction per
row (low values mean the text degenerated into repetition), how many rows share their first 16
tokens, and the first characters of a few decoded rows.

Writes ``<out>.json`` and ``<out>.md`` (default ``bench/results/self_calibration``).

    python bench/bench_self_calibration.py --nsamples 32 --seqlen 2048 --batch-size 32 \
        --save /work/notes/self_calib_32x2048.safetensors

On a shared CPU, decoding a small batch is dominated by thread synchronisation: run it with
``OMP_NUM_THREADS=1`` when other jobs are using the cores (measured ~10x faster here).
"""
import argparse
import json
import os
import time

import torch

from pyprune.data.calibration_file import save_calibration
from pyprune.data.self_calibration import DEFAULT_TEMPERATURE, DEFAULT_TOP_P, generate_calibration
from pyprune.models import load_model

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def distinct_ngram_fraction(row, n=4):
    grams = [tuple(row[i:i + n]) for i in range(len(row) - n + 1)]
    return len(set(grams)) / max(1, len(grams))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE)
    p.add_argument("--top-p", type=float, default=DEFAULT_TOP_P)
    p.add_argument("--on-eos", default="continue", choices=["continue", "suppress"])
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--save", default=None, help="calibration file to write (.safetensors)")
    p.add_argument("--out", default=os.path.join(RESULTS, "self_calibration"))
    p.add_argument("--show", type=int, default=3, help="decoded rows to print")
    args = p.parse_args()

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    t0 = time.time()
    model, tokenizer = load_model(args.model, dtype)
    load_seconds = time.time() - t0
    tokens, info = generate_calibration(
        model, tokenizer, args.nsamples, args.seqlen, seed=args.seed, temperature=args.temperature,
        top_p=args.top_p, batch_size=args.batch_size, on_eos=args.on_eos, device=device)
    info["model"] = args.model
    if args.save:
        save_calibration(args.save, tokens, info)

    rows = tokens[:, len(info["prefix_ids"]):].tolist()
    distinct = [distinct_ngram_fraction(r) for r in rows]
    heads = {tuple(r[:16]) for r in rows}
    texts = [tokenizer.decode(r) for r in tokens[: args.show]]
    result = {
        "generation": info,
        "load_seconds": load_seconds,
        "threads": torch.get_num_threads(),
        "saved_to": args.save,
        "distinct_4gram_fraction": {"mean": sum(distinct) / len(distinct), "min": min(distinct)},
        "distinct_16_token_starts": len(heads),
        "samples": [t[:600] for t in texts],
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=2)
    md = [
        f"# Self-calibration: {args.model}, {args.nsamples} x {args.seqlen} tokens",
        "",
        "| device | dtype | batch | temperature | top_p | seconds | tokens/s | EOS sampled "
        "| distinct 4-grams (mean / min) | distinct starts |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        f"| {info['device']} ({torch.get_num_threads()} threads) | {info['dtype']} "
        f"| {info['batch_size']} | {info['temperature']} | {info['top_p']} | {info['seconds']:.1f} "
        f"| {info['tokens_per_second']:.1f} | {info['eos_sampled']} "
        f"| {result['distinct_4gram_fraction']['mean']:.3f} / "
        f"{result['distinct_4gram_fraction']['min']:.3f} | {len(heads)} / {args.nsamples} |",
        "",
    ]
    for i, t in enumerate(result["samples"]):
        md += [f"Sample {i}:", "", "```", t, "```", ""]
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(md))
    print("\n".join(md[:5]))


if __name__ == "__main__":
    main()
