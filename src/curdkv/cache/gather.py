"""Copying the kept tokens out of a layer's keys and values (the dense and ragged layouts' first step)."""

from __future__ import annotations

import torch


def gather_tokens(states: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``states[b, h, indices[b, h, i], :]`` for ``states [B, H, N, D]``, ``indices [B, H, k]``."""
    # torch.gather with the index expanded over D (a stride-0 view, nothing copied) measured
    # 0.46 ms for K and V of a Llama-3.1-8B layer at 128K on an H100; index_select of whole
    # rows, which reads one index per row, measured 0.77 ms.
    expanded = indices.unsqueeze(-1).expand(-1, -1, -1, states.shape[-1])
    return states.gather(2, expanded)


def gather_kv_tokens(keys: torch.Tensor, values: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`gather_tokens` of keys and values; one Triton launch for both on CUDA."""
    from ..kernels.gather import gather_available, gather_kv

    if gather_available(keys, values):
        return gather_kv(keys, values, indices)
    return gather_tokens(keys, indices), gather_tokens(values, indices)
