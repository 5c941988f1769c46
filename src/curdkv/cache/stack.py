"""Many compressions of one context, answered in one batch.

A sweep compresses the same context with many (press, ratio)
configurations. Answering each on its own decodes one token per forward
pass, which leaves a GPU almost idle; stacking the configurations' caches on
the batch dimension answers all of them at once. The caches hold different
numbers of tokens per head, which is exactly what the ragged layout stores,
so every configuration becomes one batch row of a ragged cache.
"""

from __future__ import annotations

import torch

from .dense import CompressedCache, CompressedLayer
from .ragged import RaggedLayer


def as_ragged(layer, context_length: int) -> RaggedLayer:
    """A bare compressed layer (nothing appended yet) in the ragged layout."""
    if isinstance(layer, RaggedLayer):
        return layer
    if isinstance(layer, CompressedLayer):
        if layer.get_seq_length() != context_length:
            raise ValueError(
                f"the layer holds {layer.get_seq_length()} logical tokens, expected the context's {context_length}"
            )
        return RaggedLayer.from_dense(layer.keys, layer.values, context_length)
    raise ValueError(f"cannot stack a {type(layer).__name__}; use the dense or ragged layout")


def _same_dense_shape(layers) -> bool:
    first = layers[0]
    return all(type(layer) is CompressedLayer and layer.keys.shape == first.keys.shape
               and layer.values.shape == first.values.shape and layer.evicted == first.evicted for layer in layers)


def stack_caches(caches: list[CompressedCache], context_length: int) -> CompressedCache:
    """One cache whose batch rows are ``caches`` (each of batch size 1, same context).

    Layers that keep the same number of tokens in the dense layout (uniform
    presses at one ratio) stack densely, so PyTorch's sdpa reads them; any
    other mix becomes one ragged layer.
    """
    if not caches:
        raise ValueError("caches must not be empty")
    if len({len(c.layers) for c in caches}) != 1:
        raise ValueError("caches must have the same number of layers")
    layers = []
    for per_config in zip(*(c.layers for c in caches)):
        if _same_dense_shape(per_config):
            layers.append(CompressedLayer.from_states(torch.cat([layer.keys for layer in per_config]),
                                                      torch.cat([layer.values for layer in per_config]),
                                                      per_config[0].evicted))
        else:
            layers.append(RaggedLayer.concat([as_ragged(layer, context_length) for layer in per_config]))
    return CompressedCache.from_layers(layers)


def folded_row(layer) -> RaggedLayer:
    """A layer as bare ragged rows: the tokens appended since its compression folded into each head's context.

    A bare ragged layer is returned as it is, and a dense one as a view where
    it is contiguous, so nothing is copied that need not be.
    """
    if isinstance(layer, RaggedLayer):
        return layer.folded() if layer.tail_length else layer
    if isinstance(layer, CompressedLayer):
        return RaggedLayer.from_dense(layer.keys, layer.values, layer.get_seq_length())
    raise ValueError(f"cannot stack a {type(layer).__name__}; use the dense or ragged layout")


def stack_contexts(caches: list[CompressedCache]) -> CompressedCache:
    """One ragged cache whose batch rows are different contexts (each of batch size 1, any lengths).

    Each row keeps what its own cache holds, questions already prefilled
    included; the stack reports the longest row's length, and callers position
    every row with explicit ``position_ids``.
    """
    if not caches:
        raise ValueError("caches must not be empty")
    if len({len(c.layers) for c in caches}) != 1:
        raise ValueError("caches must have the same number of layers")
    if any(layer.keys.shape[0] != 1 for c in caches for layer in c.layers[:1]):
        raise ValueError("each context's cache must hold one row (batch size 1)")
    layers = []
    for per_context in zip(*(c.layers for c in caches)):
        rows = [folded_row(layer) for layer in per_context]
        layers.append(RaggedLayer.concat(rows, context_length=max(row.context_length for row in rows)))
    return CompressedCache.from_layers(layers)
