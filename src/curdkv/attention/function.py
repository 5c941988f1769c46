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

from ..cache.masked import MaskedKV, masked_to_dense_mask
from ..cache.ragged import RaggedKV
from ..kernels.common import on_kernel_device
from .recording import recorder_of
from .reference import bottom_right_causal_mask, ragged_attention_reference

ATTENTION_NAME = "curdkv"


def curdkv_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention function with transformers' signature: query ``[B, H, q, D]``, key/value ``[B, H_kv, kv, D]``."""
    recorder = recorder_of(module)
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


def ragged_attention(query: torch.Tensor, kv: RaggedKV, scaling: float | None = None) -> torch.Tensor:
    """Attention over a ragged layer: the Triton kernel on CUDA when available, else the reference."""
    if on_kernel_device(query):
        from ..kernels.ragged_attention import ragged_attention_triton, triton_available

        if triton_available():
            return ragged_attention_triton(query, kv, scaling)
    return ragged_attention_reference(query, kv, scaling)
