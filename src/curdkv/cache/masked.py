"""The masked layout: every entry kept, the evicted ones hidden from attention.

This is how kvpress stores head-adaptive presses. It saves no memory; here it
is the obvious reference that the ragged layout is tested against, and the
baseline that benchmarks compare with.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicLayer


@dataclass
class MaskedKV:
    """Full keys/values ``[B, H_kv, N + t, D]`` and which of the first N are kept, ``[B, H_kv, N]``."""

    keys: torch.Tensor
    values: torch.Tensor
    keep: torch.Tensor


class MaskedLayer(DynamicLayer):
    """Every entry stored, evicted context entries hidden from attention (kvpress's layout)."""

    @classmethod
    def from_mask(cls, keys: torch.Tensor, values: torch.Tensor, keep: torch.Tensor) -> "MaskedLayer":
        layer = cls()
        layer.dtype, layer.device = keys.dtype, keys.device
        layer.keys, layer.values, layer.keep = keys, values, keep
        layer.is_initialized = True
        return layer

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        keys, values = super().update(key_states, value_states)
        kv = MaskedKV(keys, values, self.keep)
        return kv, kv

    def nbytes(self) -> int:
        tensors = (self.keys, self.values, self.keep)
        return sum(t.numel() * t.element_size() for t in tensors)

    def snapshot(self):
        return self.keys, self.values

    def restore(self, state) -> None:
        self.keys, self.values = state


def masked_to_dense_mask(kv: MaskedKV, q_len: int, group: int) -> torch.Tensor:
    """Boolean ``[B, H, q, N + t]``: kept context entries, and the tail causally (bottom-right)."""
    b, h_kv, total, _ = kv.keys.shape
    n = kv.keep.shape[-1]
    t = total - n
    q_pos = torch.arange(t - q_len, t, device=kv.keys.device)[:, None]
    tail = (torch.arange(t, device=kv.keys.device)[None, :] <= q_pos)[None, None].expand(b, h_kv, -1, -1)
    ctx = kv.keep[:, :, None, :].expand(-1, -1, q_len, -1)
    return torch.cat([ctx, tail], dim=-1).repeat_interleave(group, dim=1)
