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

:class:`RaggedLayer` is the transformers cache layer that holds one layer this
way, so a head-adaptive press saves exactly as much memory as a uniform one at
the same ratio.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicLayer

from .gather import gather_kv_tokens


@dataclass
class RaggedKV:
    """One layer's keys and values as seen by the attention function.

    ``tail_keys``/``tail_values``: ``[B, H_kv, t, D]`` (any strides with a
    contiguous last dimension); the last ``q`` tail tokens are the ones being
    attended from in the current forward pass.

    A fixed-capacity tail (:mod:`curdkv.cache.fixed`) sets ``tail_start``:
    then ``t`` is the capacity, the tail holds ``tail_start + q`` tokens, and
    only rows with a nonzero ``active_rows`` entry are attended (the others
    get zeros). Both live on the device, so a decode step never asks the host.
    """

    keys: torch.Tensor
    values: torch.Tensor
    offsets: torch.Tensor
    lengths: torch.Tensor  # [B, H_kv] int64, on the CPU (for sizes without a device sync)
    tail_keys: torch.Tensor
    tail_values: torch.Tensor
    tail_start: torch.Tensor | None = None  # [1] int64 on the device
    active_rows: torch.Tensor | None = None  # [B] int32 on the device

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


# Appended tokens are written into a preallocated tail grown in steps of at
# least this many tokens, so decoding does not copy the tail at every step.
TAIL_GROWTH = 64


class RaggedLayer(DynamicLayer):
    """Per-head kept context (flat) plus a dense tail of tokens added since.

    :meth:`update` returns the same :class:`RaggedKV` as keys and values;
    curdkv's attention function recognises it. ``self.keys``/``self.values``
    expose the tail, for code that only looks at dtype and device.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.context_keys = self.context_values = None
        self.offsets = None
        self._lengths = self._host_lengths = None
        self.context_length = 0
        self.tail_length = 0
        self._tail_k = self._tail_v = None

    @classmethod
    def from_mask(
        cls, keys: torch.Tensor, values: torch.Tensor, keep: torch.Tensor, total: int | None = None
    ) -> "RaggedLayer":
        """Keep ``keys``/``values [B, H_kv, N, D]`` where ``keep [B, H_kv, N]`` is true.

        ``total``: how many entries ``keep`` has set, when the caller knows
        (a head-adaptive selection keeps exactly ``B * H_kv * budget``). The
        packing then never waits for the GPU: it needs no count read back,
        the per-head lengths stay on the device until something asks for
        them, and checking that no head is empty is left to the caller
        (:meth:`empty_heads`). Without it the lengths are read back at once
        and an empty head raises here.
        """
        if keep.shape != keys.shape[:3] or keys.shape[:3] != values.shape[:3]:
            raise ValueError(f"keep {tuple(keep.shape)}, keys {tuple(keys.shape)}, values {tuple(values.shape)} disagree")
        layer = cls()
        layer.dtype, layer.device = keys.dtype, keys.device
        if total is None:
            layer.lengths = keep.sum(-1).cpu()
            if bool((layer.lengths == 0).any()):
                raise ValueError("every KV head must keep at least one token")
            layer.context_keys, layer.context_values = keys[keep], values[keep]
            layer.offsets = offsets_from_lengths(layer.lengths, keys.device)
        else:
            rows = torch.nonzero_static(keep.reshape(-1), size=total).reshape(1, 1, total)
            flat_k, flat_v = (x.reshape(1, 1, -1, x.shape[-1]) for x in (keys, values))
            packed_k, packed_v = gather_kv_tokens(flat_k, flat_v, rows)
            layer.context_keys, layer.context_values = packed_k[0, 0], packed_v[0, 0]
            lengths = keep.sum(-1)
            layer.lengths = lengths
            layer.offsets = torch.nn.functional.pad(lengths.reshape(-1).cumsum(0), (1, 0))
        layer.context_length = keys.shape[2]
        b, h, _, d = keys.shape
        layer._tail_k = keys.new_empty(b, h, 0, d)
        layer._tail_v = values.new_empty(b, h, 0, values.shape[-1])
        layer._expose_tail()
        layer.is_initialized = True
        return layer

    @classmethod
    def from_dense(cls, keys: torch.Tensor, values: torch.Tensor, context_length: int) -> "RaggedLayer":
        """Every head keeps the same ``keys``/``values [B, H_kv, k, D]`` (no copy when contiguous)."""
        b, h, k, d = keys.shape
        layer = cls()
        layer.dtype, layer.device = keys.dtype, keys.device
        layer.context_keys, layer.context_values = keys.reshape(-1, d), values.reshape(-1, values.shape[-1])
        layer.lengths = torch.full((b, h), k, dtype=torch.int64)
        # Built on the device: copying offsets from the host would wait for the GPU's queue.
        layer.offsets = (torch.arange(0, (b * h + 1) * k, k, device=keys.device) if k
                         else torch.zeros(b * h + 1, dtype=torch.int64, device=keys.device))
        layer.context_length = context_length
        layer._tail_k, layer._tail_v = keys.new_empty(b, h, 0, d), values.new_empty(b, h, 0, values.shape[-1])
        layer._expose_tail()
        layer.is_initialized = True
        return layer

    @property
    def lengths(self) -> torch.Tensor:
        """``[B, H_kv]`` int64 context tokens per head, on the CPU (read back once if kept on the device)."""
        if self._host_lengths is None and self._lengths is not None:
            self._host_lengths = self._lengths.cpu()
        return self._host_lengths

    @lengths.setter
    def lengths(self, value: torch.Tensor) -> None:
        self._lengths = value
        self._host_lengths = value if value.device.type == "cpu" else None

    def empty_heads(self) -> torch.Tensor:
        """``[B, H_kv]`` bool: heads that kept no context token, where the lengths are (no read back)."""
        return self._lengths == 0

    @classmethod
    def concat(cls, layers: list["RaggedLayer"], context_length: int | None = None) -> "RaggedLayer":
        """Stack bare compressed contexts along the batch (e.g. several presses' caches of one prompt).

        The rows must compress contexts of the same length, unless
        ``context_length`` says what logical length the stack reports: rows of
        different lengths are then positioned by explicit ``position_ids``
        (:func:`curdkv.context.ask_many`).
        """
        if not layers:
            raise ValueError("layers must not be empty")
        if any(layer.tail_length for layer in layers):
            raise ValueError("only bare compressed contexts (nothing appended yet) can be concatenated")
        if context_length is None and len({layer.context_length for layer in layers}) != 1:
            raise ValueError("layers must compress contexts of the same length")
        first = layers[0]
        out = cls()
        out.dtype, out.device = first.dtype, first.device
        out.context_keys = torch.cat([layer.context_keys for layer in layers])
        out.context_values = torch.cat([layer.context_values for layer in layers])
        out.lengths = torch.cat([layer.lengths for layer in layers])
        out.offsets = offsets_from_lengths(out.lengths, first.device)
        out.context_length = first.context_length if context_length is None else context_length
        out._tail_k = torch.cat([layer._tail_k[:, :, :0] for layer in layers])
        out._tail_v = torch.cat([layer._tail_v[:, :, :0] for layer in layers])
        out._expose_tail()
        out.is_initialized = True
        return out

    def folded(self) -> "RaggedLayer":
        """The same tokens as a bare layer: the tail appended to every head's kept context.

        A question prefilled on one context becomes part of that row's context,
        so rows whose questions differ in length can decode in one batch (their
        tails, one token per step, stay equal).
        """
        kv = self.ragged()
        context_keys, valid = unpack_padded(kv, "keys")
        context_values, _ = unpack_padded(kv, "values")
        b, h, t = self.batch_size, valid.shape[1], self.tail_length
        keep = torch.cat([valid, valid.new_ones(b, h, t)], dim=-1)
        layer = RaggedLayer.from_mask(torch.cat([context_keys, self.keys], dim=2),
                                      torch.cat([context_values, self.values], dim=2), keep)
        layer.context_length = self.context_length + t
        return layer

    def select_rows(self, rows: list[int]) -> "RaggedLayer":
        """A layer holding only the batch ``rows`` (in that order), tail included: finished rows cost no reads."""
        heads = self.lengths.shape[1]
        starts = offsets_from_lengths(self.lengths, "cpu")
        flat = torch.cat([torch.arange(int(starts[r * heads]), int(starts[(r + 1) * heads])) for r in rows])
        flat = flat.to(self.context_keys.device)
        picked = torch.tensor(rows, device=self._tail_k.device)
        out = RaggedLayer()
        out.dtype, out.device = self.dtype, self.device
        out.context_keys, out.context_values = self.context_keys[flat], self.context_values[flat]
        out.lengths = self.lengths[rows]
        out.offsets = offsets_from_lengths(out.lengths, self.context_keys.device)
        out.context_length, out.tail_length = self.context_length, self.tail_length
        out._tail_k, out._tail_v = self._tail_k[picked], self._tail_v[picked]
        out._expose_tail()
        out.is_initialized = True
        return out

    @property
    def batch_size(self) -> int:
        return self._tail_k.shape[0]

    def _expose_tail(self) -> None:
        self.keys = self._tail_k[:, :, : self.tail_length]
        self.values = self._tail_v[:, :, : self.tail_length]

    def _reserve(self, needed: int) -> None:
        capacity = self._tail_k.shape[2]
        if needed <= capacity:
            return
        capacity = max(needed, capacity + max(TAIL_GROWTH, capacity // 2))
        for name in ("_tail_k", "_tail_v"):
            old = getattr(self, name)
            new = old.new_empty(old.shape[0], old.shape[1], capacity, old.shape[3])
            new[:, :, : self.tail_length] = old[:, :, : self.tail_length]
            setattr(self, name, new)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        q = key_states.shape[2]
        self._reserve(self.tail_length + q)
        self._tail_k[:, :, self.tail_length : self.tail_length + q] = key_states
        self._tail_v[:, :, self.tail_length : self.tail_length + q] = value_states
        self.tail_length += q
        self._expose_tail()
        kv = self.ragged()
        return kv, kv

    def ragged(self) -> RaggedKV:
        return RaggedKV(
            keys=self.context_keys,
            values=self.context_values,
            offsets=self.offsets,
            lengths=self.lengths,
            tail_keys=self.keys,
            tail_values=self.values,
        )

    @property
    def stored_length(self) -> int:
        """Largest number of tokens any head holds (context kept + tail)."""
        return int(self.lengths.max()) + self.tail_length

    def kept_lengths(self) -> torch.Tensor:
        """``[B, H_kv]`` context tokens each head kept."""
        return self.lengths.clone()

    def get_seq_length(self) -> int:
        return self.context_length + self.tail_length

    def get_mask_sizes(self, query_length: int, *args) -> tuple[int, int]:
        return self.stored_length + query_length, 0

    def nbytes(self) -> int:
        """Bytes held: kept keys and values, offsets and the allocated tail."""
        tensors = (self.context_keys, self.context_values, self.offsets, self._tail_k, self._tail_v)
        return sum(t.numel() * t.element_size() for t in tensors)

    def snapshot(self):
        return self.tail_length

    def restore(self, state) -> None:
        # Tokens past the snapshot stay in the buffer but are never read again;
        # back at the bare compressed context, the buffer itself is given back.
        self.tail_length = state
        if state == 0:
            self._tail_k, self._tail_v = self._tail_k[:, :, :0].clone(), self._tail_v[:, :, :0].clone()
        self._expose_tail()

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0 or -tokens_to_remove > self.tail_length:
            raise ValueError("a ragged layer can only drop tokens appended after compression")
        self.restore(self.tail_length + tokens_to_remove)

    def _unsupported(self, *args, **kwargs):
        raise NotImplementedError("ragged cache layers do not support beam search or batch reordering")

    batch_repeat_interleave = batch_select_indices = reorder_cache = _unsupported


