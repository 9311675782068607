"""The lm-evaluation-harness bridge: a local multiple-choice task on a tiny random Llama.

Everything is built here: a byte-level BPE tokenizer trained in memory, a 2-layer Llama from a
config, and a task YAML + JSON rows under tmp_path, so the tests run offline and in seconds.
"""
import json
import os
import random
import sys
import time

import pytest
import torch

from pyprune.eval import harness
from pyprune.solvers import SparsityPattern, magnitude

WORDS = ("the a cat dog sat on mat ran far away house tree big small red blue green went home "
         "river stone light dark old new").split()
TASK = "pyprune_tiny_mc"


# ------------------------------------------------------------------------------- fixtures


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    rng = random.Random(7)
    tok.train_from_iterator([" ".join(rng.choices(WORDS, k=30)) for _ in range(50)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def build_model(vocab_size, seed):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config).eval()
    # Larger-than-default weights so that choices get clearly different scores (few ties).
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    return model


def write_task(folder, n_items=12, seed=0, dataset_path="json", name=TASK):
    """A 4-way multiple-choice task: query text, 4 candidate continuations, gold index."""
    os.makedirs(folder, exist_ok=True)
    rng = random.Random(seed)
    data = os.path.join(folder, "items.jsonl")
    with open(data, "w") as f:
        for _ in range(n_items):
            row = {"query": " ".join(rng.choices(WORDS, k=rng.randint(3, 7))),
                   "choices": [" ".join(rng.choices(WORDS, k=rng.randint(1, 4))) for _ in range(4)],
                   "gold": rng.randrange(4)}
            f.write(json.dumps(row) + "\n")
    source = (f"dataset_kwargs:\n  data_files:\n    test: {data}\n" if dataset_path == "json" else "")
    with open(os.path.join(folder, f"{name}.yaml"), "w") as f:
        f.write(
            f"task: {name}\ndataset_path: {dataset_path}\n{source}"
            "output_type: multiple_choice\ntest_split: test\n"
            'doc_to_text: "{{query}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: gold\n'
            "metric_list:\n"
            "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
            "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n"
            "metadata:\n  version: 1.0\n"
        )
    with open(data) as f:
        return [json.loads(line) for line in f]


@torch.no_grad()
def reference_accuracy(model, tokenizer, rows):
    """acc / acc_norm computed by hand: sum of log-probs of ' ' + choice after the query."""
    acc = acc_norm = 0
    for row in rows:
        ctx = tokenizer.encode(row["query"], add_special_tokens=False)
        lls = []
        for choice in row["choices"]:
            whole = tokenizer.encode(row["query"] + " " + choice, add_special_tokens=False)
            cont = whole[len(ctx):]
            logp = torch.log_softmax(model(torch.tensor([whole[:-1]])).logits[0].float(), -1)
            positions = torch.arange(len(ctx) - 1, len(whole) - 1)
            lls.append(logp[positions, torch.tensor(cont)].sum().item())
        lls = torch.tensor(lls, dtype=torch.float64)
        lengths = torch.tensor([float(len(c)) for c in row["choices"]], dtype=torch.float64)
        acc += int(lls.argmax().item() == row["gold"])
        acc_norm += int((lls / lengths).argmax().item() == row["gold"])
    return acc / len(rows), acc_norm / len(rows)


def run_harness_directly(model, tokenizer, folder):
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1)
    out = lm_eval.simple_evaluate(model=lm, tasks=[TASK], num_fewshot=0, log_samples=False,
                                  task_manager=TaskManager(include_path=str(folder), include_defaults=False))
    row = out["results"][TASK]
    return row["acc,none"], row["acc_norm,none"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny matmuls: one thread avoids oversubscribing a shared CPU (100x slower forwards).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    pytest.importorskip("tokenizers")
    return build_tokenizer()


# ---------------------------------------------------------------------- always-run checks


def test_missing_extra_fails_early_with_install_hint(monkeypatch):
    # A None entry in sys.modules makes `import lm_eval` raise ImportError, as if not installed.
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(harness.HarnessNotInstalled, match=r"pip install 'pyprune\[eval\]'"):
        harness.evaluate_tasks(object(), object(), ["arc_easy"])
    with pytest.raises(ImportError, match=r"pyprune\[eval\]"):
        harness.resolve_tasks("arc_easy,boolq")


def test_parse_tasks():
    assert harness.parse_tasks("boolq, rte,,boolq") == ["boolq", "rte"]
    assert harness.parse_tasks(["arc_easy"]) == ["arc_easy"]
    with pytest.raises(ValueError, match="no task names"):
        harness.parse_tasks(" , ")


def test_format_table_side_by_side():
    def report(acc, norm):
        return {"harness": "lm-eval", "harness_version": "0.4.x", "mean_acc": acc, "mean_acc_norm": norm,
                "tasks": {"t1": {"acc": acc, "acc_stderr": 0.01, "acc_norm": norm, "acc_norm_stderr": None,
                                 "n": 10, "group": False}}}

    table = harness.format_table({"dense": report(0.625, 0.5), "sparse 50%": report(0.25, 0.375)})
    lines = table.splitlines()
    assert lines[0].startswith("| model") and "t1 acc" in lines[0] and "mean acc_norm" in lines[0]
    assert "62.50 ± 1.00" in lines[2] and lines[2].startswith("| dense")
    assert "25.00" in lines[3] and "37.50" in lines[3]
    assert "lm-eval 0.4.x" in table


# ------------------------------------------------------------------ harness-backed checks


def test_bridge_equals_direct_harness_and_reference(tmp_path, tokenizer):
    pytest.importorskip("lm_eval")
    rows = write_task(tmp_path / "tasks", n_items=16, seed=random.randrange(10**6))
    model = build_model(len(tokenizer), seed=random.randrange(10**6))

    report = harness.evaluate_tasks(model, tokenizer, [TASK], task_dirs=[tmp_path / "tasks"], batch_size=3)

    entry = report["tasks"][TASK]
    assert entry["n"] == len(rows) and not entry["group"]
    assert report["harness_version"] == harness.harness_version()
    assert report["harness_version"].startswith("0.4")
    ref_acc, ref_norm = reference_accuracy(model, tokenizer, rows)
    direct_acc, direct_norm = run_harness_directly(model, tokenizer, tmp_path / "tasks")
    assert entry["acc"] == pytest.approx(direct_acc, abs=1e-12)
    assert entry["acc_norm"] == pytest.approx(direct_norm, abs=1e-12)
    assert entry["acc"] == pytest.approx(ref_acc, abs=1e-12)
    assert entry["acc_norm"] == pytest.approx(ref_norm, abs=1e-12)
    assert report["mean_acc"] == pytest.approx(entry["acc"])
    assert report["mean_acc_norm"] == pytest.approx(entry["acc_norm"])
    assert entry["acc_stderr"] is not None and entry["acc_stderr"] > 0


def test_pruned_model_accuracy_in_json_report(tmp_path, tokenizer):
    pytest.importorskip("lm_eval")
    rows = write_task(tmp_path / "tasks", n_items=12, seed=random.randrange(10**6))
    model = build_model(len(tokenizer), seed=random.randrange(10**6))
    pattern = SparsityPattern(sparsity=0.5)
    pruned = total = 0
    with torch.no_grad():
        for layer in model.model.layers:
            for module in layer.modules():
                if isinstance(module, torch.nn.Linear):
                    result = magnitude.solve(module.weight.data, None, pattern)
                    module.weight.copy_(result.weight)
                    pruned += int((module.weight == 0).sum())
                    total += module.weight.numel()
    assert pruned / total == pytest.approx(0.5, abs=0.01)

    # Count forward calls on the object itself: the harness must score this model, not a reload.
    calls = []
    model.register_forward_pre_hook(lambda *_: calls.append(1))
    zero_shot = harness.evaluate_tasks(model, tokenizer, TASK, task_dirs=[tmp_path / "tasks"], limit=10)
    assert len(calls) > 0
    report = json.loads(json.dumps({"method": "magnitude", "sparsity": pruned / total, "zero_shot": zero_shot}))

    ref_acc, ref_norm = reference_accuracy(model, tokenizer, rows[:10])
    assert report["zero_shot"]["tasks"][TASK]["n"] == 10
    assert report["zero_shot"]["tasks"][TASK]["acc"] == pytest.approx(ref_acc, abs=1e-12)
    assert report["zero_shot"]["tasks"][TASK]["acc_norm"] == pytest.approx(ref_norm, abs=1e-12)
    assert report["zero_shot"]["mean_acc"] == pytest.approx(ref_acc, abs=1e-12)
    assert report["zero_shot"]["limit"] == 10


def test_unknown_task_names_the_task_and_how_to_list(tmp_path):
    pytest.importorskip("lm_eval")
    write_task(tmp_path / "tasks")
    with pytest.raises(harness.UnknownTaskError) as info:
        # The model is never touched: the name check comes before any model work.
        harness.evaluate_tasks(None, None, [TASK, "arc_easyy"], task_dirs=[tmp_path / "tasks"])
    message = str(info.value)
    assert "'arc_easyy'" in message and repr(TASK) not in message
    assert "did you mean arc_easy" in message
    assert "lm-eval ls tasks" in message
    # Harness tasks and local tasks resolve together (same cached index, no second scan).
    names, manager = harness.resolve_tasks(f"arc_easy,{TASK}", [tmp_path / "tasks"])
    assert names == ["arc_easy", TASK] and {"arc_easy", TASK} <= set(manager.all_tasks)


def test_bad_arguments_are_rejected_before_model_work(tmp_path):
    pytest.importorskip("lm_eval")
    with pytest.raises(ValueError, match="limit=0"):
        harness.evaluate_tasks(None, None, [TASK], limit=0)
    with pytest.raises(ValueError, match="batch_size=0"):
        harness.evaluate_tasks(None, None, [TASK], batch_size=0)
    with pytest.raises(FileNotFoundError, match="task folder not found"):
        harness.evaluate_tasks(None, None, [TASK], task_dirs=[tmp_path / "missing"])
    write_task(tmp_path / "tasks")
    with pytest.raises(TypeError, match="loaded Hugging Face causal LM object"):
        harness.evaluate_tasks("some/model-path", None, [TASK], task_dirs=[tmp_path / "tasks"])


@pytest.mark.parametrize("offline", [True, None])
def test_uncached_hub_dataset_offline_is_a_prompt_clear_error(tmp_path, tokenizer, offline):
    pytest.importorskip("lm_eval")
    dataset = f"pyprune-tests/no-such-dataset-{random.randrange(10**9)}"
    write_task(tmp_path / "tasks", dataset_path=dataset)
    model = build_model(len(tokenizer), seed=0)
    env_before = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    start = time.perf_counter()
    with pytest.raises(harness.TaskDataError) as info:
        harness.evaluate_tasks(model, tokenizer, [TASK], task_dirs=[tmp_path / "tasks"], offline=offline)
    # A hang guard, not a benchmark: retrying connections would take tens of seconds or more.
    assert time.perf_counter() - start < 20
    assert f"dataset '{dataset}'" in str(info.value) and TASK in str(info.value)
    # The offline switches are restored after the run.
    assert {k: os.environ.get(k) for k in env_before} == env_before


def test_missing_local_data_file_is_named(tmp_path, tokenizer):
    pytest.importorskip("lm_eval")
    write_task(tmp_path / "tasks")
    os.remove(tmp_path / "tasks" / "items.jsonl")
    model = build_model(len(tokenizer), seed=0)
    with pytest.raises(harness.TaskDataError, match="local data file .*items.jsonl.* does not exist"):
        harness.evaluate_tasks(model, tokenizer, [TASK], task_dirs=[tmp_path / "tasks"])


def test_compressed_modules_are_scored_in_memory(tmp_path, tokenizer):
    pytest.importorskip("lm_eval")
    from pyprune.nn import Int4Linear

    rows = write_task(tmp_path / "tasks", n_items=8, seed=random.randrange(10**6))
    model = build_model(len(tokenizer), seed=random.randrange(10**6))
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, torch.nn.Linear):
                    setattr(parent, name, Int4Linear.from_linear(child, groupsize=32))
    assert sum(isinstance(m, Int4Linear) for m in model.modules()) == 14
    report = harness.evaluate_tasks(model, tokenizer, [TASK], task_dirs=[tmp_path / "tasks"], batch_size=4)
    ref_acc, ref_norm = reference_accuracy(model, tokenizer, rows)
    assert report["tasks"][TASK]["acc"] == pytest.approx(ref_acc, abs=1e-12)
    assert report["tasks"][TASK]["acc_norm"] == pytest.approx(ref_norm, abs=1e-12)
