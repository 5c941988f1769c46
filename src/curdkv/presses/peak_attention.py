"""The largest attention a cached token receives from any query of the context, every key in view."""

from __future__ import annotations

import torch

from ..kernels.common import on_kernel_device
from ..kernels.peak_attention import peak_attention, peak_supported

# Logits held at once per chunk of queries (float32 entries): 512 MiB, whatever the context's length.
CHUNK_ENTRIES = 1 << 27


def evenly_spaced(n: int, m: int, device: torch.device) -> torch.Tensor:
    """``min(m, n)`` distinct positions of ``0 .. n-1``, evenly spaced, the first and the last included (``m >= 2``)."""
    if m >= n:
        return torch.arange(n, device=device)
    # Neighbours are (n - 1) / (m - 1) >= 1 apart, so rounding keeps them distinct.
    return torch.linspace(0, n - 1, m, device=device).round().long()


def peak_context_attention(queries: torch.Tensor, keys: torch.Tensor, scaling: float,
                           chunk_size: int | None = None) -> torch.Tensor:
    """For each key, its largest softmax probability over the given queries, float32 ``[B, H_kv, N]``.

    ``queries`` ``[B, H, M, D]`` (post-RoPE, at whatever positions the
    caller placed them), ``keys`` ``[B, H_kv, N, D]``; query head h reads KV
    head ``h // (H / H_kv)`` and a KV head's score is the largest over its
    group. There is no mask: every query's softmax runs over every key.
    Probabilities share one scale across heads and layers (each row sums to
    1), which is what lets one threshold spread a budget over them.

    Queries go through ``chunk_size`` at a time (by default as many as keep
    :data:`CHUNK_ENTRIES` logits), so memory does not grow with ``M · N``.
    With a bf16/fp16 cache on CUDA (and ``chunk_size`` unset) the Triton
    kernel :func:`curdkv.kernels.peak_attention.peak_attention` does it
    instead, without writing the logits out. On CUDA the logits are
    computed in the keys' dtype, as the model's own attention computes
    them: for an 8B model at 128K tokens they are about 4.5 PFLOP, over a
    minute at an H100's float32 rate and seconds on its bf16 tensor cores;
    elsewhere in float32. The softmax is float32 everywhere.
    """
    b, h, m, d = queries.shape
    h_kv, n = keys.shape[1], keys.shape[2]
    if h % h_kv:
        raise ValueError(f"{h} query heads cannot share {h_kv} KV heads evenly")
    if chunk_size is None and on_kernel_device(keys):
        half_queries = queries.to(keys.dtype)
        if peak_supported(half_queries, keys):
            return peak_attention(half_queries, keys, scaling)
    group = h // h_kv
    if chunk_size is None:
        chunk_size = max(1, CHUNK_ENTRIES // (b * h * n))
    dtype = keys.dtype if keys.is_cuda else torch.float32
    k_t = keys.to(dtype).transpose(-1, -2)  # [B, H_kv, D, N]
    peak = torch.zeros(b, h_kv, n, dtype=torch.float32, device=keys.device)
    for start in range(0, m, chunk_size):
        q = (queries[:, :, start : start + chunk_size].float() * scaling).to(dtype)
        rows = q.reshape(b, h_kv, group * q.shape[2], d)
        probs = torch.matmul(rows, k_t).float().softmax(dim=-1)
        torch.maximum(peak, probs.amax(dim=2), out=peak)
    return peak
