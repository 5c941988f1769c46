"""Ragged key/value storage: each KV head keeps its own number of tokens.

Head-adaptive presses give every (batch element, KV head) its own budget, so
a layer's kept context cannot be a dense ``[B, H_kv, k, D]`` tensor without
padding (and padding is exactly the memory we want to give back). Instead the
kept context is stored flat:

- ``keys``/``values``: ``[T, D]``, the kept tokens of head ``(b, h)`` at rows
  ``offsets[b * H_kv + h] : offsets[b * H_kv + h + 1]``, in context order;
- ``offsets``: ``[B * H_kv + 1]`` int64 on the same device.

Tokens added after compression (question, generated tokens) arrive for every
head at once, so they live in a dense *tail* ``[B, H_kv, t, D]``. Attention
is computed over the two parts as if they were one sequence per head: new
tokens see every kept context token of their head, and each other causally.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .kernels.common import on_kernel_device


@dataclass
class RaggedKV:
    """One layer's keys and values as seen by the attention function.

    ``tail_keys``/``tail_values``: ``[B, H_kv, t, D]`` (any strides with a
    contiguous last dimension); the last ``q`` tail tokens are the ones being
    attended from in the current forward pass.
    """

    keys: torch.Tensor
    values: torch.Tensor
    offsets: torch.Tensor
    lengths: torch.Tensor  # [B, H_kv] int64, on the CPU (for sizes without a device sync)
    tail_keys: torch.Tensor
    tail_values: torch.Tensor

    @property
    def batch_size(self) -> int:
        return self.tail_keys.shape[0]

    @property
    def num_kv_heads(self) -> int:
        return self.tail_keys.shape[1]

    @property
    def tail_length(self) -> int:
        return self.tail_keys.shape[2]

    @property
    def max_length(self) -> int:
        return int(self.lengths.max()) if self.lengths.numel() else 0


def offsets_from_lengths(lengths: torch.Tensor, device=None) -> torch.Tensor:
    """``[B * H_kv + 1]`` int64 start offsets for per-head ``lengths [B, H_kv]``."""
    flat = lengths.reshape(-1).to(torch.int64)
    offsets = torch.zeros(flat.numel() + 1, dtype=torch.int64)
    offsets[1:] = flat.cpu().cumsum(0)
    return offsets.to(device if device is not None else lengths.device)


def unpack_padded(kv: RaggedKV, which: str = "keys"):
    """The ragged context padded to ``[B, H_kv, L_max, D]`` plus a boolean validity mask ``[B, H_kv, L_max]``."""
    flat = kv.keys if which == "keys" else kv.values
    b, h = kv.batch_size, kv.num_kv_heads
    l_max = kv.max_length
    lengths = kv.lengths.to(flat.device)
    valid = torch.arange(l_max, device=flat.device)[None, None, :] < lengths[:, :, None]
    padded = flat.new_zeros(b, h, l_max, flat.shape[-1])
    padded[valid] = flat
    return padded, valid


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
    t = kv.tail_length
    keys = torch.cat([ctx_k, kv.tail_keys.to(ctx_k.dtype)], dim=2).float()
    values = torch.cat([ctx_v, kv.tail_values.to(ctx_v.dtype)], dim=2).float()
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
    return out.to(query.dtype).transpose(1, 2).contiguous()


def ragged_attention(query: torch.Tensor, kv: RaggedKV, scaling: float | None = None) -> torch.Tensor:
    """Attention over a ragged layer: the Triton kernel on CUDA when available, else the reference."""
    if on_kernel_device(query):
        from .kernels.ragged_attention import ragged_attention_triton, triton_available

        if triton_available():
            return ragged_attention_triton(query, kv, scaling)
    return ragged_attention_reference(query, kv, scaling)
