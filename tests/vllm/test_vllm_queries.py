"""The window queries' capture without an engine: the scheduler's slices of each step, the rows a worker
copies from a batch of several requests, a window split across prefill chunks."""

from __future__ import annotations

import pytest
import torch

from curdkv.vllm.queries import WindowQueries, WindowSlice, layer_queries, window_slice

LAYERS, HEADS, DIM = 3, 4, 8


def test_slices_of_a_context_prefilled_in_chunks():
    context, window = 300, 64
    chunks = [(0, 128), (128, 128), (256, 44)]  # the scheduler ends a chunk at the context
    parts = [window_slice(start, size, context, window) for start, size in chunks]
    assert parts == [None, WindowSlice(108, 128, 0, 64), WindowSlice(0, 44, 20, 64)]
    assert window_slice(300, 5, context, window) is None  # the question after the context
    assert window_slice(0, 310, context, window) == WindowSlice(236, 300, 0, 64)  # context and question at once


def step_queries(rows_of: list[tuple[str, int, int]], layer: int) -> torch.Tensor:
    """A batch's queries ``[tokens, H * D]`` whose every element tells its request, position and layer."""
    out = []
    for req, start, count in rows_of:
        position = torch.arange(start, start + count, dtype=torch.float32)
        value = int(req[1:]) * 1e4 + position * 10 + layer
        out.append(value[:, None].expand(count, HEADS * DIM))
    return torch.cat(out)


def run_step(store: WindowQueries, batch: list[tuple[str, int, int]], contexts: dict[str, int], window: int):
    """One step of a batch of ``(request, first position, tokens)``: plan from the slices, then every layer."""
    index = {req: i for i, (req, _, _) in enumerate(batch)}
    starts = torch.tensor([0] + [count for _, _, count in batch]).cumsum(0)
    windows = {req: part for req, start, count in batch
               if (part := window_slice(start, count, contexts[req], window)) is not None}
    store.plan(windows, index, starts)
    for layer in range(LAYERS):
        store.capture(layer, step_queries(batch, layer))
    store.clear_plan()


def test_a_window_split_across_chunks_holds_the_last_context_queries_in_order():
    window, contexts = 16, {"r1": 40, "r2": 30}
    store = WindowQueries({layer: layer for layer in range(LAYERS)})
    # r1's window (24..39) is prefilled by two steps, r2's in one; a decode row (r3) sits between them.
    run_step(store, [("r1", 0, 30), ("r2", 0, 20)], contexts | {"r3": 1}, window)
    run_step(store, [("r3", 7, 1), ("r1", 30, 10), ("r2", 20, 10)], contexts | {"r3": 1}, window)
    for req, context in contexts.items():
        buffer = store.take(req)
        expected = torch.stack([int(req[1:]) * 1e4 + torch.arange(context - window, context) * 10.0 + layer
                                for layer in range(LAYERS)])
        assert torch.equal(buffer[..., 0], expected)
        queries = layer_queries(buffer, 2, HEADS)
        assert queries.shape == (1, HEADS, window, DIM)
        assert torch.equal(queries[0, 1, :, 0], expected[2])
    assert len(store) == 0


def test_missing_rows_are_an_error_and_dropped_requests_are_forgotten():
    store = WindowQueries({layer: layer for layer in range(LAYERS)})
    run_step(store, [("r1", 0, 30)], {"r1": 40}, 16)  # the chunk holding the window's end never ran
    with pytest.raises(RuntimeError, match=r"misses window queries of layers \[0, 1, 2\] at places \[6, 7"):
        store.take("r1")
    run_step(store, [("r2", 0, 30)], {"r2": 40}, 16)
    assert len(store) == 2
    store.drop({"r2", "gone"})
    assert len(store) == 0 and store.take("r2") is None
