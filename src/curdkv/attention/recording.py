"""Queries recorded during prefill: the observation window presses read, and which layers ran.

The attention function looks up the recorder of the module it runs for
(:func:`recorder_of`); the runtime installs one with :func:`recording_queries`.
"""

from __future__ import annotations

import contextlib

import torch


def is_first_prefill(new_tokens: int, attended: int) -> bool:
    """Whether an attention call was a first prefill: it attended over exactly the tokens it brought
    (``attended`` is -1 for compressed layouts, which a first prefill never sees)."""
    return new_tokens == attended


class QueryRecorder:
    """Keeps the last ``window`` queries of each layer, ``[B, H, W, D]``.

    By default only a first prefill is recorded (the observation window).
    ``rolling=True`` records every call, appending decoded tokens' queries and
    keeping the last ``window``: the window of compression during decoding,
    and Lookahead Q-Cache's pseudo queries.
    """

    def __init__(self, window: int, rolling: bool = False):
        self.window = window
        self.rolling = rolling
        self.queries: dict[int, torch.Tensor] = {}
        # Per layer, ``(new tokens, keys attended)`` of the last call (``-1`` keys: a compressed
        # layout): the runtime's witness of which layers ran a first prefill, read whatever the
        # forward's keywords are named.
        self.calls: dict[int, tuple[int, int]] = {}

    def wants(self, q_len: int, kv_len: int) -> bool:
        return self.window > 0 and (self.rolling or is_first_prefill(q_len, kv_len))

    def record(self, layer_idx: int, query: torch.Tensor) -> None:
        previous = self.queries.get(layer_idx) if self.rolling else None
        if previous is not None and previous.shape[:2] == query.shape[:2]:
            query = torch.cat([previous, query], dim=2)
        # A copy, not a view: a view would keep the whole prefill's queries alive.
        self.queries[layer_idx] = query[:, :, -self.window :].detach().clone()

    def pop(self, layer_idx: int) -> torch.Tensor | None:
        return self.queries.pop(layer_idx, None)

    def first_prefill(self, layer_idx: int) -> bool:
        """Whether the layer's last recorded call was a first prefill."""
        return is_first_prefill(*self.calls[layer_idx])

    def first_prefill_layers(self) -> list[int]:
        return [i for i in sorted(self.calls) if self.first_prefill(i)]


# Attention modules (by id) whose queries are being recorded.
_recorders: dict[int, QueryRecorder] = {}


@contextlib.contextmanager
def recording_queries(modules, recorder: QueryRecorder):
    """Record queries of ``modules`` into ``recorder`` inside the block.

    Blocks nest: an inner recorder (pseudo queries decoded while a prefill's
    compression runs) replaces the outer one until it exits.
    """
    keys = [id(m) for m in modules]
    previous = {k: _recorders[k] for k in keys if k in _recorders}
    for k in keys:
        _recorders[k] = recorder
    try:
        yield recorder
    finally:
        for k in keys:
            if k in previous:
                _recorders[k] = previous[k]
            else:
                _recorders.pop(k, None)


def recorder_of(module) -> QueryRecorder | None:
    """The recorder installed for this attention module, if any."""
    return _recorders.get(id(module))
