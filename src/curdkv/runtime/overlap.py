"""Layer-by-layer compression on a second CUDA stream, overlapped with the prefill.

A long prefill is compute-bound (attention and MLP matrix products), while
compressing a layer is memory-bound reads plus small, latency-bound solves
and selections. Run on the prefill's own stream, compression adds its full
GPU time to the prefill; queued on a second stream right after a layer's
attention, it runs beside the next layers' work and mostly fills SMs and
memory bandwidth they leave idle. The kept tokens are the same either way.

What makes this work is that nothing waits for the GPU until the prefill's
forward pass ends: no value is read back to the host mid-layer (the NaN and
empty-head checks are queued as small GPU tensors and read once, at the
end), and every tensor crossing streams is marked with ``record_stream`` so
the caching allocator does not hand its memory out while the other stream
may still use it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LayerProblems:
    """What one compressed layer's checks found, still on the device."""

    press: object
    layer_idx: int
    seq_len: int
    counts: torch.Tensor  # [1 or 2, B, H_kv] int64: NaN scores per head, then (if checked) head kept nothing (0/1)

    def message(self, counts: torch.Tensor) -> str | None:
        """The error for ``counts`` read back to the host, ``None`` if the layer is sound."""
        nan = counts[0]
        if bool((nan > 0).any()):
            return nan_message(self.press, self.layer_idx, nan, self.seq_len,
                               "found when the prefill ended; compress(..., overlap=False) checks each layer at once "
                               "and says whether its inputs were finite")
        if len(counts) > 1 and bool((counts[1] > 0).any()):
            return empty_head_message(self.layer_idx)
        return None


def nan_message(press, layer_idx: int, nan_per_head: torch.Tensor, seq_len: int, detail: str) -> str:
    """The one error for NaN scores: which press, layer and KV heads (``nan_per_head``: ``[B, H_kv]`` counts)."""
    heads = sorted({int(h) for h in (nan_per_head > 0).nonzero()[:, 1].tolist()})
    return (f"{press!r} returned {int(nan_per_head.sum())} NaN scores at layer {layer_idx}, KV heads {heads}, "
            f"over {seq_len} tokens ({detail})")


def empty_head_message(layer_idx: int) -> str:
    return f"every KV head must keep at least one token; at layer {layer_idx} some kept none"


def layer_problems(press, layer_idx: int, scores: torch.Tensor, empty_heads: torch.Tensor | None) -> LayerProblems:
    """Queue one layer's checks on the GPU: NaN scores per head and heads left empty."""
    nan = torch.isnan(scores).sum(-1)
    # A uniform selection keeps the same count in every head: no empty-head row (two launches fewer).
    counts = nan[None] if empty_heads is None else torch.stack([nan, empty_heads.to(nan.dtype)])
    return LayerProblems(press, layer_idx, scores.shape[-1], counts)


class SideStream:
    """Runs each layer's compression on its own CUDA stream; :meth:`finish` joins it.

    The side stream has the higher priority: its blocks are scheduled as soon
    as SMs free up, so each layer's full cache is released early instead of
    piling up behind the prefill.
    """

    def __init__(self):
        self.streams: dict[torch.device, torch.cuda.Stream] = {}
        self.pending: list[LayerProblems] = []
        self.busy: set[torch.device] = set()

    def run(self, fn, inputs: tuple, device: torch.device):
        """``fn(problems)`` on the side stream of ``device`` after the work queued so far; returns its layer."""
        main = torch.cuda.current_stream(device)
        side = self.streams.get(device)
        if side is None:
            side = self.streams[device] = torch.cuda.Stream(device=device, priority=-1)
        side.wait_stream(main)
        for t in inputs:
            if isinstance(t, torch.Tensor) and t.is_cuda:
                t.record_stream(side)
        self.busy.add(device)
        with torch.cuda.stream(side):
            layer = fn(self.pending)
        for t in vars(layer).values():
            if isinstance(t, torch.Tensor) and t.is_cuda:
                t.record_stream(main)
        return layer

    def finish(self, check: bool = True) -> None:
        """Make the prefill's stream wait for every queued compression; raise the first problem found."""
        for device in self.busy:
            torch.cuda.current_stream(device).wait_stream(self.streams[device])
        self.busy.clear()
        pending, self.pending = self.pending, []
        if check:
            found = first_problem(pending)
            if found is not None:
                raise ValueError(found[1])


def first_problem(pending: list[LayerProblems]) -> tuple[LayerProblems, str] | None:
    """The first layer whose checks failed and its error, read back from the device at once."""
    if not pending:
        return None
    device = pending[0].counts.device
    flat = torch.cat([p.counts.reshape(-1).to(device) for p in pending]).cpu()
    for problem, counts in zip(pending, flat.split([p.counts.numel() for p in pending])):
        message = problem.message(counts.reshape(problem.counts.shape))
        if message is not None:
            return problem, message
    return None
