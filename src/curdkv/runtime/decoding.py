"""Compression while generating: every layer's cache held at a fixed size.

Prefill compression alone lets a long generation grow the cache without
bound. With ``curdkv.compress(model, press, max_cache_tokens=C)`` each layer
keeps at most ``C`` tokens per KV head for the whole generation: the prefill
is cut to ``min(press's budget, C)``, and whenever decoding appends a token
past ``C`` the press scores the cache again and the lowest-scoring token is
evicted, so the cache stays at exactly ``C`` (MorphKV's constant-size
regime, arXiv 2503.00979, for any uniform press).

The press's observation window during decoding is the queries of the last
tokens decoded (a rolling window, started with the prefill's last queries),
and its scores see each cached token's RoPE position, which after evictions
no longer equals its index in the cache.
"""

from __future__ import annotations

import torch

from ..attention.recording import QueryRecorder
from ..cache.dense import CompressedLayer
from ..cache.gather import gather_kv_tokens
from ..presses.base import Press
from .layer import select_tokens
from .model import num_layers


def check_max_cache_tokens(press: Press, max_cache_tokens) -> int:
    """Validate ``max_cache_tokens`` against what the press must always keep."""
    protected = press.protected_sinks + press.protected_recent
    if isinstance(max_cache_tokens, bool) or not isinstance(max_cache_tokens, int) or max_cache_tokens <= protected:
        raise ValueError(
            f"max_cache_tokens must be an integer > {protected} (the press protects num_sinks="
            f"{press.protected_sinks} + window={press.protected_recent} tokens), got {max_cache_tokens!r}"
        )
    if press.head_adaptive:
        raise ValueError(
            f"max_cache_tokens needs a press with one budget for every head; {press.name!r} is head-adaptive"
        )
    if press.compresses_after_prefill:
        raise ValueError(
            f"max_cache_tokens needs a press that compresses layer by layer; {press.name!r} needs the whole prefill first"
        )
    return max_cache_tokens


class DecodeBudget:
    """Keeps every layer of a generation at ``max_cache_tokens`` tokens per KV head (dense layout).

    Called after each attention module's forward (see :func:`curdkv.compress`);
    ``recorder`` is a rolling :class:`QueryRecorder` of the press's window.
    """

    def __init__(self, press: Press, max_cache_tokens: int, recorder: QueryRecorder):
        self.press = press
        self.max_cache_tokens = check_max_cache_tokens(press, max_cache_tokens)
        self.recorder = recorder
        self.positions: dict[int, torch.Tensor] = {}  # layer -> [B, H_kv, stored] RoPE positions

    def after_attention(self, module, cache, new_tokens: int) -> int:
        """Hold the layer of ``module`` at the budget after ``new_tokens`` were appended; returns what it holds."""
        idx = module.layer_idx
        layer = cache.layers[idx]
        stored = layer.keys.shape[2]
        first_prefill = self.recorder.first_prefill(idx)
        if first_prefill:
            n_keep = min(self.press.layer_keep(stored, idx, num_layers(module)), self.max_cache_tokens)
            positions = torch.arange(stored, device=layer.keys.device).expand(*layer.keys.shape[:2], -1)
            evicted = 0
        else:
            n_keep = self.max_cache_tokens
            logical = layer.get_seq_length()
            evicted = getattr(layer, "evicted", 0)
            previous = self.positions.get(idx)
            if previous is None:
                if evicted:
                    raise ValueError(
                        "the cache was compressed outside this curdkv.compress(..., max_cache_tokens=...) block; "
                        "prefill it inside the block"
                    )
                previous = torch.arange(stored - new_tokens, device=layer.keys.device).expand(*layer.keys.shape[:2], -1)
            appended = torch.arange(logical - new_tokens, logical, device=layer.keys.device)
            positions = torch.cat([previous, appended.expand(*layer.keys.shape[:2], -1)], dim=-1)
        if stored > n_keep:
            queries = self.recorder.queries.get(idx)
            chosen = select_tokens(
                self.press, layer.keys, layer.values, queries, module, idx, n_keep=n_keep,
                positions=None if first_prefill else positions,
            )
            keys, values = gather_kv_tokens(layer.keys, layer.values, chosen)
            positions = positions.gather(-1, chosen)
            evicted += stored - n_keep
        else:
            keys, values = layer.keys, layer.values
        if isinstance(layer, CompressedLayer):
            layer.set_states(keys, values, evicted)
        else:
            cache.layers[idx] = CompressedLayer.from_states(keys, values, evicted)
        self.positions[idx] = positions
        return keys.shape[2]
