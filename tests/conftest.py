"""Test configuration.

``TRITON_INTERPRET=1`` must be set before any Triton kernel module is imported, so Triton kernels
run on CPU tensors here; GPU-only tests are marked ``cuda`` and skipped without a GPU.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def data_dir():
    """The shared text data (``../shared/data`` beside the repository, or $PYPRUNE_DATA_DIR)."""
    here = os.path.dirname(os.path.abspath(__file__))
    path = os.environ.get("PYPRUNE_DATA_DIR") or os.path.join(here, "..", "..", "shared", "data")
    if not os.path.isfile(os.path.join(path, "wikitext-2-raw-v1", "test.jsonl")):
        pytest.fail(f"test data not found at {path}: set PYPRUNE_DATA_DIR to the shared data folder")
    return os.path.abspath(path)


@pytest.fixture(scope="session")
def tiny_saved_model(tmp_path_factory, data_dir):
    """A tiny Llama (GQA) saved as a Hugging Face folder with a small BPE tokenizer trained on
    WikiText, plus a small data folder laid out like the shared one."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("tiny")
    texts = []
    with open(os.path.join(data_dir, "wikitext-2-raw-v1", "test.jsonl")) as f:
        for line in f:
            texts.append(json.loads(line)["text"])
            if len(texts) >= 400:
                break
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=256, special_tokens=["<unk>", "<s>", "</s>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg)
    model_dir = root / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)

    data = root / "data"
    for sub, name, rows in (("c4", "sample.jsonl", texts[:300]), ("wikitext-2-raw-v1", "test.jsonl", texts),
                            ("wikitext-2-raw-v1", "validation.jsonl", texts[:200])):
        (data / sub).mkdir(parents=True, exist_ok=True)
        with open(data / sub / name, "w") as f:
            for t in rows:
                f.write(json.dumps({"text": t}) + "\n")
    return str(model_dir), str(data)
