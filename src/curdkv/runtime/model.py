"""Which models the runtime can compress, and where their attention modules are."""

from __future__ import annotations

import contextlib

import torch

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def attention_modules(model) -> list[torch.nn.Module]:
    """The self-attention module of every decoder layer, in order."""
    check_model(model)
    return [layer.self_attn for layer in model.model.layers]


def check_model(model) -> None:
    """Raise a clear error for models the runtime cannot compress."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"unsupported architecture {model_type!r}: model must be a causal LM of type {list(SUPPORTED_MODEL_TYPES)}"
        )
    layer_types = getattr(config, "layer_types", None) or []
    sliding = any(t != "full_attention" for t in layer_types)
    if model_type == "mistral" and getattr(config, "sliding_window", None) is not None:
        sliding = True
    if sliding:
        raise ValueError(
            "unsupported attention: the model uses sliding-window layers; curdkv compresses full-attention caches "
            "(set config.sliding_window=None / use_sliding_window=False to run it with full attention)"
        )
    if not hasattr(getattr(model, "model", None), "layers"):
        raise ValueError(f"unsupported model class {type(model).__name__}: expected model.model.layers")


def num_layers(module) -> int:
    """Decoder layers of the model an attention module belongs to (1 without a config)."""
    return int(getattr(getattr(module, "config", None), "num_hidden_layers", 1) or 1)


# id() of the models inside a compress() block: a second compression of the same prefill would
# cut an already compressed cache and count its evicted tokens twice.
_compressing: set[int] = set()


def refuse_inside_compress(model, what: str) -> None:
    """Raise when ``model`` is inside a :func:`compress` block (``what`` names the caller)."""
    if id(model) in _compressing:
        raise RuntimeError(
            f"{what} inside curdkv.compress(...) on the same model would compress its prefill twice and "
            "corrupt the cache's logical length; leave the compress() block first"
        )


@contextlib.contextmanager
def compressing(model):
    """Mark ``model`` as inside a :func:`~curdkv.runtime.hooks.compress` block for the block's duration."""
    _compressing.add(id(model))
    try:
        yield
    finally:
        _compressing.discard(id(model))
