"""``model.generate`` inside ``curdkv.compress``: its decode steps replayed as a CUDA graph.

``generate`` chooses every token on the host (logits processors, sampling,
stopping criteria), so the replayed step returns logits only
(:class:`~curdkv.runtime.graph_decode.LogitsGraph`). While a compress block
is open on CUDA, the model's ``forward`` is wrapped: a pass that decodes one
token per row over a compressed cache is served by the graph, anything else
(the prefill, a pass asking for hidden states or attentions, a cache the
block did not compress) by the model's own forward.

At the first decode step of a cache its layers become fixed-capacity layers
(:mod:`curdkv.cache.fixed`) in place, so the caller's cache object keeps
reporting the right length and holds the generated tokens afterwards. The
tail starts with room for :data:`FIRST_CAPACITY` tokens and doubles when
full (a copy of the tail and a new capture).
"""

from __future__ import annotations

import torch
from ..cache.dense import CompressedLayer
from ..cache.fixed import FixedCapacityCache
from ..cache.ragged import RaggedLayer
from ..transformers_compat import causal_lm_output, find_cache
from .graph_decode import LogitsGraph

FIRST_CAPACITY = 256
# Forward arguments that ask for more than the logits: such passes run the model's own forward.
_EXTRA_OUTPUTS = ("inputs_embeds", "labels", "output_attentions", "output_hidden_states")


class GraphGenerate:
    """Wraps ``model.forward`` for the length of a compress block (:meth:`install` / :meth:`remove`).

    ``hooks``: the block's compression hooks, told when a pass was served by the graph.
    """

    def __init__(self, model, hooks, capture: bool = True):
        self.model, self.hooks, self.capture = model, hooks, capture
        self.graphs: dict[int, tuple[FixedCapacityCache, LogitsGraph]] = {}  # id(cache) -> its graph
        self.original = None

    def install(self) -> None:
        self.original = self.model.forward
        self.model.forward = self.forward

    def remove(self) -> None:
        if self.model.__dict__.get("forward") == self.forward:
            del self.model.__dict__["forward"]
        self.graphs.clear()

    def _decodes(self, cache, input_ids, kwargs) -> bool:
        if self.hooks.depth != 1:
            return False  # a forward nested in a hooked one (lookahead decoding) is curdkv's own
        if cache is None or not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] != 1:
            return False
        if any(kwargs.get(name) not in (None, False) for name in _EXTRA_OUTPUTS) or not cache.layers:
            return False
        if self._known(cache) is not None:
            return True
        return all(type(layer) in (CompressedLayer, RaggedLayer) for layer in cache.layers)

    def _known(self, cache) -> tuple[FixedCapacityCache, LogitsGraph] | None:
        """The graph already serving ``cache``, if its layers are still that graph's."""
        known = self.graphs.get(id(cache))
        return known if known is not None and cache.layers[0] is known[0].layers[0] else None

    def _graph(self, cache) -> LogitsGraph:
        known = self._known(cache)
        if known is not None:
            fixed, graph = known
            if fixed.state.host_filled < fixed.state.capacity:
                return graph
            fixed = fixed.grown(2 * fixed.state.capacity)
        else:
            fixed = FixedCapacityCache.from_cache(cache, FIRST_CAPACITY)
        cache.layers[:] = fixed.layers  # the caller's cache decodes in place from now on
        graph = LogitsGraph(self.model, fixed, self.capture)
        self.graphs[id(cache)] = (fixed, graph)
        return graph

    def forward(self, *args, **kwargs):
        cache = find_cache(args, kwargs)
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if not self._decodes(cache, input_ids, kwargs):
            return self.original(*args, **kwargs)
        graph = self._graph(cache)
        position = kwargs.get("position_ids")
        if position is None:
            position = torch.full_like(input_ids, cache.layers[0].get_seq_length())
        logits = graph(input_ids, position)
        self.hooks.graph_served = True  # the compress hooks verify nothing of a pass no attention module ran
        return causal_lm_output(logits[:, None], cache)

