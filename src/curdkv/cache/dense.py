"""Where the kept keys and values live.

A compressed layer holds only the kept tokens, ``[B, H_kv, k, D]``, plus the
number of tokens it evicted, so that the cache still reports the *logical*
sequence length (context length + tokens added since). transformers derives
RoPE positions and input slicing from that length, which is why generation
after compression continues at the right positions.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class CompressedLayer(DynamicLayer):
    """A dynamic cache layer that may have had tokens evicted.

    ``keys``/``values``: ``[B, H_kv, k + t, D]`` (k kept context tokens, t
    appended since). ``evicted``: tokens removed, counted in
    :meth:`get_seq_length` so positions continue after the original context.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.evicted = 0

    @classmethod
    def from_states(cls, keys: torch.Tensor, values: torch.Tensor, evicted: int = 0) -> "CompressedLayer":
        layer = cls()
        layer.set_states(keys, values, evicted)
        return layer

    def set_states(self, keys: torch.Tensor, values: torch.Tensor, evicted: int) -> None:
        if keys.shape != values.shape[:-1] + keys.shape[-1:]:
            raise ValueError(f"keys {tuple(keys.shape)} and values {tuple(values.shape)} disagree")
        self.dtype, self.device = keys.dtype, keys.device
        self.keys, self.values = keys, values
        self.evicted = int(evicted)
        self.is_initialized = True

    @property
    def stored_length(self) -> int:
        """Tokens physically held per head."""
        if not self.is_initialized or self.keys is None or self.keys.numel() == 0:
            return 0
        return self.keys.shape[-2]

    def get_seq_length(self) -> int:
        return self.stored_length + self.evicted

    def get_mask_sizes(self, query_length: int, *args) -> tuple[int, int]:
        # Masks describe what is stored; curdkv's attention function builds its own.
        return self.stored_length + query_length, 0

    def reset(self) -> None:
        self.evicted = 0
        super().reset()

    def snapshot(self):
        return self.keys, self.values, self.evicted, self.is_initialized

    def restore(self, state) -> None:
        self.keys, self.values, self.evicted, self.is_initialized = state

    def nbytes(self) -> int:
        if not self.is_initialized or self.keys is None:
            return 0
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()


def layer_nbytes(layer) -> int:
    if hasattr(layer, "nbytes"):
        return layer.nbytes()
    keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
    if keys is None or values is None:
        return 0
    return keys.numel() * keys.element_size() + values.numel() * values.element_size()


def cache_nbytes(cache) -> int:
    """Bytes of keys and values really held by any transformers cache."""
    return sum(layer_nbytes(layer) for layer in cache.layers)


class CompressedCache(DynamicCache):
    """A transformers ``DynamicCache`` whose layers may hold compressed contexts.

    It behaves like a ``DynamicCache`` before compression; after it, each
    layer holds only the kept tokens and :meth:`nbytes` reports what is held.
    Use it with curdkv's attention function (``curdkv.compress`` and
    ``curdkv.prefill`` switch it on): masks built by transformers' other
    attention functions assume no eviction.
    """

    def __init__(self):
        super().__init__()
        self.layers = []
        self.layer_class_to_replicate = CompressedLayer

    @classmethod
    def from_layers(cls, layers: list[CompressedLayer]) -> "CompressedCache":
        cache = cls()
        cache.layers = list(layers)
        return cache

    def nbytes(self) -> int:
        """Bytes of keys and values held, over all layers."""
        return cache_nbytes(self)

    def snapshot(self) -> list:
        """Every layer's state, without copying tensors (appending never writes into held tokens)."""
        return [layer.snapshot() for layer in self.layers]

    def restore(self, snapshot: list) -> None:
        """Return to a :meth:`snapshot`, dropping tokens appended since."""
        del self.layers[len(snapshot) :]
        for layer, state in zip(self.layers, snapshot):
            layer.restore(state)
