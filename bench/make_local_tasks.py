"""Build a local multiple-choice task for lm-evaluation-harness from the project's own text.

Next-sentence choice: the context is two consecutive sentences of a WikiText-2 article (or a C4
document); the choices are the true next sentence and three distractor sentences of similar
length (within a factor 1.5, so length is no cue) drawn from other documents ("other-docs", the
default) or from elsewhere in the same document ("same-doc", task name suffix ``_hard``: the model
has to follow the discourse, not just the topic; SmolLM2-135M is near chance on it). The choices
are shuffled with a seeded generator; the gold index is stored with each item.

Writes ``OUT/<task>.jsonl`` (one item per line) and ``OUT/<task>.yaml`` (a harness task whose
``dataset_kwargs.data_files`` is the absolute path of the JSON file, so pass ``OUT`` as a task
folder: ``evaluate_tasks(..., task_dirs=[OUT])`` or ``lm-eval --include_path OUT``).

    python bench/make_local_tasks.py                       # 300 items from the WikiText-2 test split
    python bench/make_local_tasks.py --source c4 --items 200 --out bench/tasks
"""
import argparse
import json
import os
import random
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DATA = os.environ.get("PYPRUNE_DATA", "/work/shared/data")
DEFAULT_OUT = os.path.join(HERE, "tasks")
SOURCES = {
    "wikitext": lambda data, split: os.path.join(data, "wikitext-2-raw-v1", f"{split}.jsonl"),
    "c4": lambda data, split: os.path.join(data, "c4", "c4-sample-200docs.jsonl"),
}
# Sentence length bounds (characters) for contexts and choices: no headings, no run-ons.
MIN_CHARS, MAX_CHARS = 40, 300
# A distractor's length must lie within this factor of the true sentence's, so length is no cue.
LENGTH_RATIO = 1.5

_WIKITEXT_FIXES = [
    (" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), (" , ", ", "), (" . ", ". "), (" ; ", "; "),
    (" : ", ": "), (" ! ", "! "), (" ? ", "? "), (" 's", "'s"), (" n't", "n't"), ("( ", "("),
    (" )", ")"), ("[ ", "["), (" ]", "]"),
]
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")
# A piece ending like this does not end a sentence: an initial ("W.") or a common abbreviation.
_NOT_AN_END = re.compile(
    r"(?:\b[A-Z]|\b(?:No|Nos|Mr|Mrs|Ms|Dr|St|Jr|Sr|Lt|Col|Gen|Capt|Sgt|Maj|Mt|Co|Inc|Ltd|vs|etc|"
    r"approx|Fig|Vol|Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sep|Sept|Oct|Nov|Dec|U\.S|U\.K))\.$")


def detokenize_wikitext(text: str) -> str:
    """Undo WikiText's tokenization spaces (``word , word @-@ word`` -> ``word, word-word``)."""
    for old, new in _WIKITEXT_FIXES:
        text = text.replace(old, new)
    text = re.sub(r'" ([^"]*?) "', r'"\1"', text)
    text = re.sub(r" ([.,;:!?])$", r"\1", text.strip())
    return text


def read_documents(source: str, path: str):
    """Documents as lists of paragraphs (strings)."""
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line)["text"] for line in f if line.strip()]
    if source == "c4":
        return [[p.strip() for p in row.split("\n") if p.strip()] for row in rows]
    docs, current = [], []
    for row in rows:
        line = row.strip()
        if not line:
            continue
        if line.startswith("= ") and not line.startswith("= ="):  # a new article's title
            if current:
                docs.append(current)
            current = []
        elif not line.startswith("="):  # skip section headings
            current.append(detokenize_wikitext(line))
    if current:
        docs.append(current)
    return docs


def split_sentences(paragraph: str):
    sentences = []
    for piece in _SENTENCE_END.split(paragraph):
        piece = piece.strip()
        if sentences and _NOT_AN_END.search(sentences[-1]):
            sentences[-1] += " " + piece
        elif piece:
            sentences.append(piece)
    return sentences


def _usable(sentence: str) -> bool:
    return MIN_CHARS <= len(sentence) <= MAX_CHARS


def build_items(docs, n_items: int, seed: int, distractors: str = "other-docs", context_sentences: int = 2):
    """Up to ``n_items`` items ``{"context", "choices", "gold", "doc"}``."""
    if distractors not in ("same-doc", "other-docs"):
        raise ValueError(f"distractors={distractors!r}; allowed: same-doc, other-docs")
    rng = random.Random(seed)
    # Every sentence with its (doc, paragraph, position) so distractors can be drawn by doc.
    sentences = []  # (doc_index, flat_index_in_doc, text)
    candidates = []  # (doc_index, paragraph sentences, index of the target sentence)
    for d, doc in enumerate(docs):
        flat = 0
        for paragraph in doc:
            sents = split_sentences(paragraph)
            for i, s in enumerate(sents):
                sentences.append((d, flat + i, s))
                context = sents[i - context_sentences:i] if i >= context_sentences else []
                if context and _usable(s) and all(len(c) >= 20 for c in context) \
                        and sum(map(len, context)) <= 2 * MAX_CHARS:
                    candidates.append((d, sents, i, flat + i))
            flat += len(sents)
    by_doc = {}
    for d, pos, s in sentences:
        if _usable(s):
            by_doc.setdefault(d, []).append((pos, s))
    rng.shuffle(candidates)
    items = []
    for d, sents, i, pos in candidates:
        if len(items) >= n_items:
            break
        target = sents[i]
        if distractors == "same-doc":
            pool = [s for p, s in by_doc.get(d, []) if abs(p - pos) > 3]
        else:
            pool = [s for dd, _, s in sentences if dd != d and _usable(s)]
            pool = rng.sample(pool, min(len(pool), 400))
        pool = [s for s in pool if s != target and 1 / LENGTH_RATIO <= len(s) / len(target) <= LENGTH_RATIO]
        pool = sorted(set(pool))
        if len(pool) < 3:
            continue
        choices = rng.sample(pool, 3) + [target]
        rng.shuffle(choices)
        items.append({"context": " ".join(sents[i - context_sentences:i]), "choices": choices,
                      "gold": choices.index(target), "doc": d})
    return items


TASK_YAML = """\
# Generated by bench/make_local_tasks.py: next-sentence choice among 4 candidates.
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: gold
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
  source: {source}
  split: {split}
  distractors: {distractors}
  seed: {seed}
"""


def task_name(source: str, distractors: str = "other-docs") -> str:
    return f"pyprune_nextsent_{source}" + ("" if distractors == "other-docs" else "_hard")


def write_task(out_dir: str, source: str = "wikitext", split: str = "test", n_items: int = 300,
               seed: int = 0, distractors: str = "other-docs", data_dir: str = DEFAULT_DATA) -> dict:
    """Build and write one task; returns ``{"task", "yaml", "data", "items"}``."""
    if source not in SOURCES:
        raise ValueError(f"source={source!r}; allowed: {', '.join(SOURCES)}")
    if n_items < 1:
        raise ValueError(f"n_items={n_items}: must be >= 1")
    path = SOURCES[source](data_dir, split)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"text not found: {path} (set --data-dir or PYPRUNE_DATA)")
    items = build_items(read_documents(source, path), n_items, seed, distractors)
    if len(items) < n_items:
        print(f"note: only {len(items)} items could be built from {path}", file=sys.stderr)
    task = task_name(source, distractors)
    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    data = os.path.join(out_dir, f"{task}.jsonl")
    with open(data, "w", encoding="utf-8") as f:
        for item in items:
            f.write(json.dumps(item, ensure_ascii=False) + "\n")
    yaml_path = os.path.join(out_dir, f"{task}.yaml")
    with open(yaml_path, "w", encoding="utf-8") as f:
        f.write(TASK_YAML.format(task=task, data=data, source=source, split=split,
                                 distractors=distractors, seed=seed))
    return {"task": task, "yaml": yaml_path, "data": data, "items": len(items)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", default="wikitext", choices=sorted(SOURCES))
    p.add_argument("--split", default="test", help="WikiText split (test, validation); ignored for c4")
    p.add_argument("--items", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--distractors", default="other-docs", choices=["other-docs", "same-doc"])
    p.add_argument("--data-dir", default=DEFAULT_DATA)
    p.add_argument("--out", default=DEFAULT_OUT, help="task folder to write (default: bench/tasks)")
    args = p.parse_args(argv)
    info = write_task(args.out, args.source, args.split, args.items, args.seed, args.distractors, args.data_dir)
    print(json.dumps(info))
    return info


if __name__ == "__main__":
    main()
