"""Attention over a (possibly compressed) cache, registered with transformers.

``curdkv`` is registered in transformers' ``AttentionInterface``; the runtime
switches a model to it for the duration of a compression or a question. It
does two things the stock functions cannot:

- attends correctly when the cache holds fewer tokens than the logical
  sequence: new tokens see every stored token, and each other causally
  (bottom-right aligned), whatever was evicted;
- attends over head-adaptive caches: the ragged layout (each KV head its
  own kept tokens; a Triton kernel on CUDA, a PyTorch reference elsewhere)
  and the masked reference layout;
- records the post-RoPE queries of the last context tokens during prefill,
  so a press that needs the observation window never recomputes ``q_proj``.

No mask is built by transformers for this implementation (it is not in the
mask interface), so padding is refused by the runtime rather than ignored.
"""

from __future__ import annotations

import contextlib

import torch
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .ragged import RaggedKV, ragged_attention
from .ragged_layer import MaskedKV, masked_to_dense_mask

ATTENTION_NAME = "curdkv"


class QueryRecorder:
    """Keeps the last ``window`` queries of each layer, ``[B, H, W, D]``.

    By default only a first prefill is recorded (the observation window).
    ``rolling=True`` records every call, appending decoded tokens' queries and
    keeping the last ``window``: the window of compression during decoding,
    and Lookahead Q-Cache's pseudo queries.
    """

    def __init__(self, window: int, rolling: bool = False):
        self.window = window
        self.rolling = rolling
        self.queries: dict[int, torch.Tensor] = {}
        # Per layer, ``(new tokens, keys attended)`` of the last call (``-1`` keys: a compressed
        # layout): the runtime's witness of which layers ran a first prefill, read whatever the
        # forward's keywords are named.
        self.calls: dict[int, tuple[int, int]] = {}

    def wants(self, q_len: int, kv_len: int) -> bool:
        return self.window > 0 and (self.rolling or q_len == kv_len)

    def record(self, layer_idx: int, query: torch.Tensor) -> None:
        previous = self.queries.get(layer_idx) if self.rolling else None
        if previous is not None and previous.shape[:2] == query.shape[:2]:
            query = torch.cat([previous, query], dim=2)
        # A copy, not a view: a view would keep the whole prefill's queries alive.
        self.queries[layer_idx] = query[:, :, -self.window :].detach().clone()

    def pop(self, layer_idx: int) -> torch.Tensor | None:
        return self.queries.pop(layer_idx, None)


# Attention modules (by id) whose queries are being recorded.
_recorders: dict[int, QueryRecorder] = {}


@contextlib.contextmanager
def recording_queries(modules, recorder: QueryRecorder):
    """Record queries of ``modules`` into ``recorder`` inside the block.

    Blocks nest: an inner recorder (pseudo queries decoded while a prefill's
    compression runs) replaces the outer one until it exits.
    """
    keys = [id(m) for m in modules]
    previous = {k: _recorders[k] for k in keys if k in _recorders}
    for k in keys:
        _recorders[k] = recorder
    try:
        yield recorder
    finally:
        for k in keys:
            if k in previous:
                _recorders[k] = previous[k]
            else:
                _recorders.pop(k, None)


def bottom_right_causal_mask(q_len: int, kv_len: int, device) -> torch.Tensor:
    """Boolean ``[1, 1, q, kv]``: query i (the i-th of the last q tokens) sees keys ``<= kv - q + i``."""
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    k_pos = torch.arange(kv_len, device=device)[None, :]
    return (k_pos <= q_pos)[None, None]


def curdkv_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention function with transformers' signature: query ``[B, H, q, D]``, key/value ``[B, H_kv, kv, D]``."""
    recorder = _recorders.get(id(module))
    if recorder is not None:
        # Ragged and masked layers are compressed already: they never see a first prefill.
        kv_len = key.shape[2] if isinstance(key, torch.Tensor) else -1
        recorder.calls[module.layer_idx] = (query.shape[2], kv_len)
        if recorder.wants(query.shape[2], kv_len):
            recorder.record(module.layer_idx, query)
    if isinstance(key, RaggedKV):
        return ragged_attention(query, key, scaling), None
    if isinstance(key, MaskedKV):
        mask = masked_to_dense_mask(key, query.shape[2], query.shape[1] // key.keys.shape[1])
        sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
        return sdpa(module, query, key.keys, key.values, mask, dropout=dropout, scaling=scaling, **kwargs)
    q_len, kv_len = query.shape[2], key.shape[2]
    if attention_mask is not None:
        # Only reachable when a caller passes a ready 4D mask; honour it as given.
        mask = attention_mask
    elif q_len == 1 or q_len == kv_len:
        mask = None  # sdpa's own causal handling is exact here
    else:
        mask = bottom_right_causal_mask(q_len, kv_len, query.device)
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    return sdpa(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)


def register() -> str:
    """Register the attention function (idempotent) and return its name."""
    if ATTENTION_NAME not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(ATTENTION_NAME, curdkv_attention)
    return ATTENTION_NAME


@contextlib.contextmanager
def using_curdkv_attention(model):
    """Switch ``model`` to curdkv's attention inside the block, restoring the previous one after."""
    register()
    previous = model.config._attn_implementation
    if previous == ATTENTION_NAME:
        yield
        return
    model.set_attn_implementation(ATTENTION_NAME)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)
