"""Raw text for calibration and evaluation, from a local folder or Hugging Face ``datasets``.

Local layout (``--data-dir D``), one JSON object per line with the text under ``"text"``::

    D/c4/*.jsonl                          C4 documents (calibration)
    D/wikitext-2-raw-v1/test.jsonl        WikiText-2 raw test split (evaluation)
    D/wikitext-2-raw-v1/validation.jsonl  WikiText-2 raw validation split
"""
import glob
import json
import os
from typing import List, Optional

DATASETS = ("c4", "wikitext2")
LAYOUT = (
    "expected layout: DATA_DIR/c4/*.jsonl and DATA_DIR/wikitext-2-raw-v1/{test,validation}.jsonl, "
    'one JSON object per line with a "text" field'
)


def local_files(dataset: str, split: str, data_dir: str) -> List[str]:
    if dataset == "c4":
        pattern = os.path.join(data_dir, "c4", "*.jsonl")
        files = sorted(glob.glob(pattern))
        if not files:
            raise FileNotFoundError(f"no C4 files found at {pattern}; {LAYOUT}")
        return files
    if dataset == "wikitext2":
        path = os.path.join(data_dir, "wikitext-2-raw-v1", f"{split}.jsonl")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"WikiText-2 {split} split not found at {path}; {LAYOUT}")
        return [path]
    raise ValueError(f"unknown dataset {dataset!r}; allowed: {', '.join(DATASETS)}")


def read_jsonl(path: str) -> List[str]:
    texts = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                texts.append(json.loads(line)["text"])
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}:{lineno}: not a JSON object with a \"text\" field ({exc})") from None
    return texts


def load_texts(dataset: str, split: str, data_dir: Optional[str]) -> List[str]:
    """Rows of ``dataset``/``split`` from ``data_dir``, or from the Hub when ``data_dir`` is None."""
    if data_dir is not None:
        if not os.path.isdir(data_dir):
            raise FileNotFoundError(f"data directory not found: {data_dir}; {LAYOUT}")
        texts = []
        for path in local_files(dataset, split, data_dir):
            texts += read_jsonl(path)
        return texts
    return _hub_texts(dataset, split)


def _hub_texts(dataset, split):
    try:
        import datasets
    except ImportError:
        raise RuntimeError(
            "no --data-dir given and the `datasets` package is not installed; "
            "pass --data-dir or pip install 'pyprune[online]'"
        ) from None
    if dataset == "wikitext2":
        rows = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
    elif dataset == "c4":
        rows = datasets.load_dataset(
            "allenai/c4", data_files={"train": "en/c4-train.00000-of-01024.json.gz"}, split="train"
        )
    else:
        raise ValueError(f"unknown dataset {dataset!r}; allowed: {', '.join(DATASETS)}")
    return list(rows["text"])
