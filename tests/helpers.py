"""Shortcuts the tests share that the library itself has no use for."""

from __future__ import annotations

from curdkv.runtime.layer import compress_layer


def compress_states(press, keys, values, queries, module, layer_idx: int):
    """Keep a uniform press's choice of tokens: returns ``(kept_keys, kept_values, evicted)``.

    keys, values: ``[B, H_kv, N, D]``; queries: ``[B, H, W, D]`` or ``None``.
    """
    layer = compress_layer(press, keys, values, queries, module, layer_idx, "dense")
    return layer.keys, layer.values, layer.evicted


def stored_lengths(cache) -> list[int]:
    """Tokens per head each layer of a compressed cache holds."""
    return [layer.stored_length for layer in cache.layers]
