"""A compressed cache with a fixed capacity, for decoding replayed as a CUDA graph.

A CUDA graph replays the same kernels on the same memory: nothing in a
decode step may allocate a new tensor for the cache, change a shape, or
ask the host how long the cache is. So the layer built here holds

- the kept context of every (row, KV head), as the ragged layout stores it
  (a view of the compressed cache it came from, no copy when contiguous);
- a tail preallocated for everything that will be appended (the question
  and the answer), ``[B, H_kv, capacity, D]``;
- the number of tail tokens written so far and which rows still decode, as
  device tensors shared by every layer (:class:`TailState`), so that one
  in-place increment per step serves the whole model.

The attention kernel reads those device values and is launched with a grid
sized by the capacity (:func:`curdkv.kernels.ragged_attention.ragged_attention_triton`).
The cache it came from is not modified: a question decoded here leaves the
compressed context exactly as it was.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

from .dense import CompressedCache
from .ragged import RaggedKV, RaggedLayer
from .stack import folded_row


class TailState:
    """What every layer of one fixed-capacity cache shares: the tail's fill and the live rows.

    ``filled`` ``[1]`` int64 and ``active`` ``[B]`` int32 live on the
    device and change in place (a graph reads them at replay);
    ``host_filled`` mirrors ``filled`` for the eager code around the graph.
    """

    def __init__(self, batch_size: int, capacity: int, device):
        self.capacity = capacity
        self.filled = torch.zeros(1, dtype=torch.int64, device=device)
        self.active = torch.ones(batch_size, dtype=torch.int32, device=device)
        self.host_filled = 0
        self._index: torch.Tensor | None = None

    def reserve(self, q: int) -> None:
        """Raise unless ``q`` more tokens fit."""
        if self.host_filled + q > self.capacity:
            raise ValueError(
                f"the fixed-capacity cache holds {self.capacity} appended tokens; "
                f"{self.host_filled} are written and {q} more do not fit"
            )

    def write_index(self, q: int) -> torch.Tensor:
        """``[q]`` tail slots the current forward pass writes (computed once, shared by every layer)."""
        self.reserve(q)
        if q == 1:
            return self.filled
        if self._index is None or self._index.numel() != q:
            self._index = self.filled + torch.arange(q, device=self.filled.device)
        return self._index

    def advance(self, q: int) -> None:
        """The forward pass that wrote ``q`` tokens is done: later passes write after them."""
        self.filled.add_(q)
        self.host_filled += q
        self._index = None


class FixedCapacityLayer(DynamicLayer):
    """One layer's kept context plus a preallocated tail; see the module docstring."""

    def __init__(self, kept: RaggedLayer | FixedCapacityLayer, state: TailState):
        super().__init__()
        self.dtype, self.device = kept.dtype, kept.device
        self.context_keys, self.context_values = kept.context_keys, kept.context_values
        self.offsets, self.lengths = kept.offsets, kept.lengths
        self.context_length = kept.context_length
        self.state = state
        b, h = kept.lengths.shape
        # Allocated to the dtype of the keys projected at decode time, which is the kept context's.
        self.tail_keys = kept.context_keys.new_zeros(b, h, state.capacity, kept.context_keys.shape[-1])
        self.tail_values = kept.context_values.new_zeros(b, h, state.capacity, kept.context_values.shape[-1])
        if isinstance(kept, FixedCapacityLayer):  # a grown copy: the tokens appended so far come along
            filled = kept.state.host_filled
            self.tail_keys[:, :, :filled] = kept.tail_keys[:, :, :filled]
            self.tail_values[:, :, :filled] = kept.tail_values[:, :, :filled]
        self.keys, self.values = self.tail_keys, self.tail_values  # dtype/device for code that looks
        # What attention reads, described once: every tensor it names stays in place for the layer's life.
        self.kv = RaggedKV(
            keys=self.context_keys, values=self.context_values, offsets=self.offsets, lengths=self.lengths,
            tail_keys=self.tail_keys, tail_values=self.tail_values,
            tail_start=state.filled, active_rows=state.active,
        )
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        index = self.state.write_index(key_states.shape[2])
        self.tail_keys.index_copy_(2, index, key_states.to(self.tail_keys.dtype))
        self.tail_values.index_copy_(2, index, value_states.to(self.tail_values.dtype))
        return self.kv, self.kv

    @property
    def stored_length(self) -> int:
        return int(self.lengths.max()) + self.state.host_filled

    def get_seq_length(self) -> int:
        return self.context_length + self.state.host_filled

    def get_mask_sizes(self, query_length: int, *args) -> tuple[int, int]:
        return self.stored_length + query_length, 0

    def nbytes(self) -> int:
        tensors = (self.context_keys, self.context_values, self.offsets, self.tail_keys, self.tail_values)
        return sum(t.numel() * t.element_size() for t in tensors)

    def _unsupported(self, *args, **kwargs):
        raise NotImplementedError("a fixed-capacity cache layer is decoded in place; it cannot be cropped or reordered")

    crop = batch_repeat_interleave = batch_select_indices = reorder_cache = _unsupported


class FixedCapacityCache(CompressedCache):
    """Every layer of a compressed cache at a fixed capacity of ``capacity`` appended tokens."""

    def __init__(self):
        super().__init__()
        self.state: TailState | None = None

    @classmethod
    def from_cache(cls, cache, capacity: int) -> "FixedCapacityCache":
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be an integer >= 1, got {capacity!r}")
        if not cache.layers:
            raise ValueError("the cache holds no layer: prefill a context first")
        kept = [folded_row(layer) for layer in cache.layers]
        out = cls()
        out.state = TailState(kept[0].batch_size, capacity, kept[0].device)
        out.layers = [FixedCapacityLayer(layer, out.state) for layer in kept]
        return out

    def grown(self, capacity: int) -> FixedCapacityCache:
        """The same cache with room for ``capacity`` appended tokens (the tokens appended so far copied over)."""
        if capacity < self.state.host_filled:
            raise ValueError(f"capacity {capacity} is below the {self.state.host_filled} tokens already appended")
        out = type(self)()
        out.state = TailState(self.batch_size, capacity, self.state.filled.device)
        out.state.filled.copy_(self.state.filled)
        out.state.active.copy_(self.state.active)
        out.state.host_filled = self.state.host_filled
        out.layers = [FixedCapacityLayer(layer, out.state) for layer in self.layers]
        return out

    @property
    def batch_size(self) -> int:
        return self.state.active.shape[0]
