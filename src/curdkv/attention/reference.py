"""Obvious attention references: what the fast paths are tested against.

The ragged reference pads each head's kept context and masks the padding, in
float32; it runs anywhere and is the CPU path of the attention function.
"""

from __future__ import annotations

import math

import torch

from ..cache.ragged import RaggedKV, unpack_padded


def ragged_attention_reference(query: torch.Tensor, kv: RaggedKV, scaling: float | None = None) -> torch.Tensor:
    """Attention of ``query [B, H, q, D]`` over a ragged layer; returns ``[B, q, H, D]``.

    The obvious computation in float32: pad each head's context, mask the
    padding, append the tail with a bottom-right causal mask, softmax. Runs
    anywhere; the reference the fast kernels are tested against.
    """
    b, n_heads, q_len, d = query.shape
    h_kv = kv.num_kv_heads
    if n_heads % h_kv:
        raise ValueError(f"{n_heads} query heads cannot share {h_kv} KV heads evenly")
    group = n_heads // h_kv
    scaling = 1.0 / math.sqrt(d) if scaling is None else scaling
    ctx_k, valid = unpack_padded(kv, "keys")
    ctx_v, _ = unpack_padded(kv, "values")
    tail_k, tail_v = kv.tail_keys, kv.tail_values
    if kv.tail_start is not None:  # a fixed-capacity tail: only its filled part counts
        t = int(kv.tail_start) + q_len
        tail_k, tail_v = tail_k[:, :, :t], tail_v[:, :, :t]
    t = tail_k.shape[2]
    keys = torch.cat([ctx_k, tail_k.to(ctx_k.dtype)], dim=2).float()
    values = torch.cat([ctx_v, tail_v.to(ctx_v.dtype)], dim=2).float()
    q_pos = torch.arange(t - q_len, t, device=query.device)[:, None]
    tail_visible = torch.arange(t, device=query.device)[None, :] <= q_pos  # [q, t]
    mask = torch.cat(
        [valid[:, :, None, :].expand(-1, -1, q_len, -1), tail_visible[None, None].expand(b, h_kv, -1, -1)], dim=-1
    )  # [B, H_kv, q, L + t]
    keys = keys.repeat_interleave(group, dim=1)
    values = values.repeat_interleave(group, dim=1)
    mask = mask.repeat_interleave(group, dim=1)
    logits = (query.float() @ keys.transpose(-1, -2)) * scaling
    logits = logits.masked_fill(~mask, float("-inf"))
    out = torch.softmax(logits, dim=-1) @ values
    if kv.active_rows is not None:
        out = out * (kv.active_rows != 0).to(out.device)[:, None, None, None]
    return out.to(query.dtype).transpose(1, 2).contiguous()


def bottom_right_causal_mask(q_len: int, kv_len: int, device) -> torch.Tensor:
    """Boolean ``[1, 1, q, kv]``: query i (the i-th of the last q tokens) sees keys ``<= kv - q + i``."""
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    k_pos = torch.arange(kv_len, device=device)[None, :]
    return (k_pos <= q_pos)[None, None]
