"""The observation window's queries inside vLLM 0.32.0: the last ``W`` context tokens' post-RoPE queries of
every layer, gathered across prefill chunks for presses that score from them (SnapKV and its kin).

The paged cache keeps no queries, so the worker copies them as they reach each
``Attention`` module: vLLM's Llama applies ``rotary_emb`` before calling
``Attention.forward(query, key, value)``, so a forward pre-hook sees post-RoPE
queries ``[num_tokens, num_heads * head_size]``, the rows of each request
between ``query_start_loc[i]`` and ``query_start_loc[i + 1]`` of its batch row
``i``. The scheduler knows which of a step's tokens fall in a request's window
(:func:`window_slice`), so each row lands in its place of the window and a
window split across chunks is filled by several steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class WindowSlice:
    """The part of a request's window computed in one step.

    The request's rows ``[start, stop)`` of this step fill window places
    ``first ..``; ``window`` is the window's length.
    """

    start: int
    stop: int
    first: int
    window: int


def window_slice(computed: int, scheduled: int, context: int, window: int) -> WindowSlice | None:
    """Which of the tokens ``computed .. computed + scheduled - 1`` lie in the last ``window`` of ``context``."""
    begin = context - window
    lo, hi = max(computed, begin), min(computed + scheduled, context)
    if lo >= hi:
        return None
    return WindowSlice(lo - computed, hi - computed, lo - begin, window)


class WindowQueries:
    """Per request, each layer's window queries ``[num_layers, W, num_heads * head_size]``, filled row by row."""

    def __init__(self, layer_positions: dict[int, int]):
        self.layer_positions = layer_positions  # layer index -> place in the buffers
        self.buffers: dict[str, torch.Tensor] = {}
        self.filled: dict[str, torch.Tensor] = {}
        self._plan: list[tuple[str, int, int, int]] = []

    def plan(self, windows: dict[str, WindowSlice], batch_index: dict[str, int], query_start_loc) -> None:
        """This step's copies: ``(request, first row in the batch, rows, first window place)``."""
        self._plan = []
        for req_id, part in windows.items():
            offset = int(query_start_loc[batch_index[req_id]])
            self._plan.append((req_id, offset + part.start, part.stop - part.start, part.first))
            if req_id not in self.filled:
                self.filled[req_id] = torch.zeros(len(self.layer_positions), part.window, dtype=torch.bool)

    def clear_plan(self) -> None:
        self._plan = []

    @property
    def planned(self) -> bool:
        return bool(self._plan)

    def capture(self, layer_idx: int, query: torch.Tensor) -> None:
        """Copy this step's window rows of ``query`` (``[num_tokens, ...]``, as ``Attention.forward`` gets it)."""
        rows = query.reshape(query.shape[0], -1)
        where = self.layer_positions[layer_idx]
        for req_id, row, count, first in self._plan:
            buffer = self.buffers.get(req_id)
            if buffer is None:
                filled = self.filled[req_id]
                buffer = self.buffers[req_id] = rows.new_zeros(*filled.shape, rows.shape[1])
            buffer[where, first:first + count] = rows[row:row + count]
            self.filled[req_id][where, first:first + count] = True

    def take(self, req_id: str) -> torch.Tensor | None:
        """The request's window queries (``None`` if it has none), forgotten here; raises if some are missing."""
        buffer, filled = self.buffers.pop(req_id, None), self.filled.pop(req_id, None)
        if filled is not None and not bool(filled.all()):
            layers, places = (~filled).nonzero(as_tuple=True)
            raise RuntimeError(f"curdkv: request {req_id} misses window queries of layers "
                               f"{sorted(set(layers.tolist()))} at places {sorted(set(places.tolist()))}")
        return buffer

    def drop(self, req_ids) -> None:
        for req_id in req_ids:
            self.buffers.pop(req_id, None)
            self.filled.pop(req_id, None)

    def __len__(self) -> int:
        return len(self.buffers) + len(self.filled)


def layer_queries(buffer: torch.Tensor, where: int, num_heads: int) -> torch.Tensor:
    """One layer's window ``[1, H, W, D]``, the shape and order the HF path records (last W context tokens)."""
    window = buffer[where]
    return window.view(window.shape[0], num_heads, -1).transpose(0, 1)[None]
