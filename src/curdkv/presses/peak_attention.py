"""The largest attention a cached token receives from any query of the context, every key in view."""

from __future__ import annotations

import torch


def peak_context_attention(queries: torch.Tensor, keys: torch.Tensor, scaling: float,
                           chunk_size: int = 256) -> torch.Tensor:
    """For each key, its largest softmax probability over the context's queries, float32 ``[B, H_kv, N]``.

    ``queries`` ``[B, H, N, D]`` are the context tokens' own (post-RoPE)
    queries, ``keys`` ``[B, H_kv, N, D]``; query head h reads KV head
    ``h // (H / H_kv)`` and a KV head's score is the largest over its group.
    Unlike the prefill's attention there is no causal mask: every query's
    softmax runs over the whole context, as the queries of KVzip's
    reconstruction passes see it (arXiv 2505.23416), so an early token is
    scored by the later tokens that need it. Probabilities share one scale
    across heads and layers (each row sums to 1), which is what lets one
    threshold spread a budget over them.

    Queries go through ``chunk_size`` at a time: memory is
    ``O(B · H · chunk_size · N)`` floats, and the cost one QKᵀ of the
    prefill's attention.
    """
    b, h, n, d = queries.shape
    h_kv = keys.shape[1]
    if h % h_kv:
        raise ValueError(f"{h} query heads cannot share {h_kv} KV heads evenly")
    group = h // h_kv
    k_t = keys.float().transpose(-1, -2)  # [B, H_kv, D, N]
    peak = torch.zeros(b, h_kv, keys.shape[2], dtype=torch.float32, device=keys.device)
    for start in range(0, n, chunk_size):
        q = queries[:, :, start : start + chunk_size].float() * scaling
        rows = q.reshape(b, h_kv, group * q.shape[2], d)
        torch.maximum(peak, torch.matmul(rows, k_t).softmax(dim=-1).amax(dim=2), out=peak)
    return peak
