"""Decoding replayed as one CUDA graph per step.

Decoding one token runs over a thousand small kernels (per layer: norms,
projections, RoPE, the cache write, attention, the MLP). Launched one by one
from Python, the launches cost more than the kernels: on an H200 an 8B model
decodes at 30-100 ms per token that way, where reading its weights and its
kept cache takes 4-8 ms. A CUDA graph records the step's kernels once and
replays them with one launch.

The captured step runs over a :class:`~curdkv.cache.fixed.FixedCapacityCache`
and is either :class:`~curdkv.runtime.lean_step.LeanStep` (the model's own
weights with the element-wise work fused, for the architectures it knows) or
transformers' own forward (any other model). :class:`GraphDecoder` appends
the greedy choice and the next step's bookkeeping, so a replay needs nothing
from the host:

- the input token and the positions are static buffers the step itself
  overwrites;
- the cache writes at a device-resident index, and the attention kernel
  reads the tail's fill and the live rows from the device;
- the chosen tokens go to a device buffer; a row whose token is an end
  token is marked inactive, so its attention reads nothing from then on.

:class:`LogitsGraph` hands the logits back instead, for ``generate``
(:mod:`curdkv.runtime.graph_generate`). A replay runs exactly the kernels of
the same step run eagerly, so its tokens equal that step's, bit for bit; no
compiler is involved (docs/design.md says why not torch.compile).

The host never waits for the step it just launched: it reads the "all rows
done" flag of the step :data:`LOOKAHEAD` launches back, through pinned
memory, so the GPU always has the next steps queued and at most
``LOOKAHEAD`` extra steps run past the last end token.
"""

from __future__ import annotations

import warnings
import weakref

import torch

from ..cache.fixed import FixedCapacityCache
from ..transformers_compat import forward_with_cache
from .lean_step import LeanStep, lean_step_agrees, lean_step_unsupported

# Steps launched ahead of the one whose "done" flag the host reads.
LOOKAHEAD = 2


def graphs_possible(device: torch.device) -> bool:
    """Whether CUDA-graph decoding can run here: a CUDA device and Triton (for the fixed-capacity kernel)."""
    if torch.device(device).type != "cuda":
        return False
    from ..kernels.ragged_attention import triton_available

    return triton_available()


def resolve_cuda_graph(cuda_graph, device) -> bool:
    """``cuda_graph`` (``None``: wherever possible, ``True``: required, ``False``: never) for ``device``."""
    if cuda_graph is not None and not isinstance(cuda_graph, bool):
        raise ValueError(f"cuda_graph must be None, True or False, got {cuda_graph!r}")
    possible = graphs_possible(device)
    if cuda_graph and not possible:
        raise ValueError(
            f"cuda_graph=True needs a CUDA device and Triton; the model is on {torch.device(device)}"
            f"{'' if torch.device(device).type != 'cuda' else ' and Triton is not installed'}"
        )
    return possible if cuda_graph is None else cuda_graph


# Models whose lean step was compared with transformers' forward: model -> whether it agreed.
_LEAN_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class StepGraph:
    """One decode step over a fixed-capacity cache: run once for real, then captured and replayed.

    The step reads the token ids and positions from :attr:`input_ids` and
    :attr:`position` (``[R, 1]`` buffers); subclasses say what happens to its
    logits (:meth:`after`), inside the graph. ``capture=False`` runs the
    same step eagerly (what the graph is tested against). ``lean``: the step
    is :class:`~curdkv.runtime.lean_step.LeanStep` (``None``: where the model
    supports it; ``False``: transformers' forward).
    """

    def __init__(self, model, cache: FixedCapacityCache, capture: bool = True, lean: bool | None = None):
        rows, device = cache.batch_size, cache.state.filled.device
        self.model, self.cache, self.capture = model, cache, capture
        self.input_ids = torch.zeros(rows, 1, dtype=torch.int64, device=device)
        self.position = torch.zeros(rows, 1, dtype=torch.int64, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.started = False
        self.replays_expected = True  # capture only when a replay will follow the first step
        self.lean_step = None
        if lean is not False and _LEAN_CHECKED.get(model, True):
            reason = lean_step_unsupported(model)
            if reason is None:
                self.lean_step = LeanStep(model, cache)
            elif lean:
                raise ValueError(f"lean=True: {reason}")

    def _transformers_logits(self) -> torch.Tensor:
        out = forward_with_cache(self.model, self.cache, input_ids=self.input_ids, position_ids=self.position,
                                 use_cache=True, logits_to_keep=1)
        return out.logits[:, -1]

    def _logits(self) -> torch.Tensor:
        if self.lean_step is not None:
            return self.lean_step(self.input_ids, self.position)
        return self._transformers_logits()

    def after(self, logits: torch.Tensor) -> None:
        """What the step does with its logits ``[R, V]`` (device work only: it is replayed)."""

    def _step(self, logits: torch.Tensor | None = None) -> None:
        # Everything here runs on the device with fixed shapes: it is what the graph replays.
        logits = self._logits() if logits is None else logits
        self.cache.state.filled.add_(1)
        self.after(logits)

    def _checked_step(self) -> None:
        """A step that first compares the lean step with transformers' forward, once per model."""
        if self.lean_step is None or self.model in _LEAN_CHECKED:
            self._step()
            return
        reference = self._transformers_logits()  # both write this token's K/V into the same slot
        ok, error = lean_step_agrees(self.lean_step(self.input_ids, self.position), reference)
        _LEAN_CHECKED[self.model] = ok
        if not ok:
            warnings.warn(f"the lean decode step's logits differ from transformers' (relative error {error:.2e}); "
                          "this model decodes with transformers' forward instead", stacklevel=4)
            self.lean_step = None
            reference = self._transformers_logits()  # rewrite the slot with transformers' K/V
        self._step(reference)

    def start(self) -> None:
        """The first step, run for real (on a side stream, as capture requires: it compiles the kernels), then the capture."""
        if self.started:
            raise RuntimeError("this step graph has started already")
        self.started = True
        self.cache.state.reserve(1)
        if not self.capture:
            self._checked_step()
        else:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._checked_step()
            torch.cuda.current_stream().wait_stream(side)
        self.cache.state.host_filled += 1
        self.first_outputs()
        if self.capture and self.replays_expected:
            try:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    self._step()  # recorded, not run
                self.graph = graph
            except RuntimeError as error:
                warnings.warn(f"CUDA-graph capture failed ({error}); decoding eagerly instead, which is slower "
                              "but gives the same tokens (pass cuda_graph=False to skip the attempt)", stacklevel=3)

    def first_outputs(self) -> None:
        """Keep what the first (real) step produced before the capture rebinds the step's outputs."""

    def replay(self) -> None:
        """One more step (the first one is :meth:`start`)."""
        self.cache.state.reserve(1)
        if self.graph is not None:
            self.graph.replay()
        else:
            self._step()
        self.cache.state.host_filled += 1


class GraphDecoder(StepGraph):
    """Greedy steps: the argmax, its bookkeeping and the row's end all inside the replayed step.

    ``token [R]``: each row's last chosen token, not yet in the cache;
    ``position [R]``: its RoPE position. ``stop``: end token ids ``[S]``.

    ``forced [R, F]`` with ``forced_lengths [R]``: each row first reads its own
    ``forced_lengths[r]`` tokens (a question; ``token`` is then ``forced[:, 0]``),
    one per step, and chooses tokens from its last one on: ``steps - F + 1``
    tokens, whatever its question's length. So questions of different lengths
    are fed to every row of the batch at once by the same replayed step, rather
    than prefilled one row at a time (``tokens[r, forced_lengths[r] - 1:]`` is
    row ``r``'s answer).
    """

    def __init__(self, model, cache: FixedCapacityCache, token: torch.Tensor, position: torch.Tensor,
                 stop: torch.Tensor, steps: int, capture: bool = True, lean: bool | None = None,
                 forced: torch.Tensor | None = None, forced_lengths: torch.Tensor | None = None):
        room = cache.state.capacity - cache.state.host_filled
        if steps > room:
            raise ValueError(f"{steps} decode steps do not fit: the cache has room for {room} more tokens")
        if (forced is None) != (forced_lengths is None):
            raise ValueError("forced and forced_lengths go together")
        super().__init__(model, cache, capture, lean)
        rows = cache.batch_size
        self.stop, self.steps = stop, steps
        self.forced, self.forced_lengths = forced, forced_lengths
        # A row with a shorter question ends as many steps earlier, its answer as long as the longest's.
        self.row_steps = None if forced is None else steps - forced.shape[1] + forced_lengths
        self.replays_expected = steps > 1
        self.input_ids.copy_(token.reshape(rows, 1))
        self.position.copy_(position.reshape(rows, 1))
        self.done = torch.isin(token.reshape(rows), stop) if forced is None else forced_lengths < 1
        cache.state.active.copy_((~self.done).to(torch.int32))
        self.tokens = torch.zeros(rows, steps, dtype=torch.int64, device=token.device)
        self.step_index = torch.zeros(1, dtype=torch.int64, device=token.device)
        self.all_done: torch.Tensor | None = None

    def after(self, logits: torch.Tensor) -> None:
        token = logits.argmax(-1)
        self.tokens.index_copy_(1, self.step_index, token[:, None])
        self.step_index.add_(1)
        ended = (token[:, None] == self.stop[None, :]).any(-1)
        if self.forced is not None:
            # While a row still has question tokens to read, its next input is the next of them
            # and its argmax is no answer yet (nor its end).
            reading = self.step_index < self.forced_lengths
            upcoming = self.forced.index_select(1, self.step_index.clamp(max=self.forced.shape[1] - 1))[:, 0]
            ended = (ended & ~reading) | (self.step_index >= self.row_steps)
            token = torch.where(reading, upcoming, token)
        self.done |= ended
        self.cache.state.active.copy_((~self.done).to(torch.int32))
        self.all_done = self.done.all()
        self.input_ids.copy_(token[:, None])
        self.position.add_(1)

    def first_outputs(self) -> None:
        self.first_all_done = self.all_done

    def run(self) -> torch.Tensor:
        """Decode up to ``steps`` tokens per row; returns them ``[R, n]`` (rows past their end hold filler)."""
        if not self.started:
            self.start()
        n = 1
        if self.steps == 1 or bool(self.first_all_done):
            return self.tokens[:, :1]
        on_cuda = self.tokens.device.type == "cuda"
        flags = torch.zeros(self.steps, dtype=torch.bool, pin_memory=on_cuda)
        events = []
        for k in range(1, self.steps):
            self.replay()
            n += 1
            flags[k].copy_(self.all_done, non_blocking=on_cuda)
            if not on_cuda:
                if bool(flags[k]):
                    break
                continue
            event = torch.cuda.Event()
            event.record()
            events.append(event)
            back = len(events) - 1 - LOOKAHEAD
            if back >= 0:
                events[back].synchronize()
                if bool(flags[back + 1]):
                    break
        return self.tokens[:, :n]


class LogitsGraph(StepGraph):
    """A replayed step that hands its logits back, for decoding loops that choose tokens themselves (``generate``)."""

    def after(self, logits: torch.Tensor) -> None:
        self.logits = logits

    def __call__(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Logits ``[R, V]`` (a copy) of ``input_ids [R, 1]`` at ``position_ids [R, 1]``."""
        self.input_ids.copy_(input_ids)
        self.position.copy_(position_ids)
        if not self.started:
            self.start()
            return self.first_logits
        self.replay()
        return self.logits.clone()

    def first_outputs(self) -> None:
        self.first_logits = self.logits.clone()


def decodable_on_graph(cache) -> bool:
    """Whether every layer of ``cache`` can be decoded at a fixed capacity (dense or ragged layouts)."""
    from ..cache.dense import CompressedLayer
    from ..cache.ragged import RaggedLayer

    return bool(cache.layers) and all(isinstance(layer, (CompressedLayer, RaggedLayer)) for layer in cache.layers)


def answer_rows_on_graph(model, cache, questions: list[torch.Tensor], starts: torch.Tensor, stop: torch.Tensor,
                         max_new_tokens: int, capture: bool = True, lean: bool | None = None) -> list[list[int]]:
    """Greedy answers (up to ``max_new_tokens`` tokens each) of every row of ``cache`` to its own question.

    ``questions``: each row's token ids ``[Q_r]``, read from position
    ``starts[r]`` on (its context's length). The questions are fed to all rows at
    once by the replayed step (:class:`GraphDecoder`'s ``forced``), so a batch pays
    ``max Q_r`` batched steps for them instead of one eager prefill per row.
    ``cache`` is left unchanged. The caller has switched the model to curdkv's attention.
    """
    rows, device = len(questions), starts.device
    lengths = torch.tensor([q.numel() for q in questions], device=device)
    if rows != cache.batch_size or int(lengths.min()) < 1:
        raise ValueError(f"questions must hold one non-empty question per row of the cache ({cache.batch_size}), "
                         f"got {rows} of lengths {lengths.tolist()}")
    width = int(lengths.max())
    forced = torch.zeros(rows, width, dtype=torch.int64, device=device)
    for r, question in enumerate(questions):
        forced[r, : question.numel()] = question.to(device)
    steps = width - 1 + max_new_tokens  # the longest question's tokens, then its answer's (the last is never read)
    fixed = FixedCapacityCache.from_cache(cache, steps)
    decoder = GraphDecoder(model, fixed, forced[:, 0], starts, stop, steps, capture=capture, lean=lean, forced=forced,
                           forced_lengths=lengths)
    tokens = decoder.run().tolist()
    return [row[n - 1: n - 1 + max_new_tokens] for row, n in zip(tokens, lengths.tolist())]


def answer_on_graph(model, cache, ids: torch.Tensor, positions: torch.Tensor, stop: torch.Tensor,
                    max_new_tokens: int, capture: bool = True, lean: bool | None = None) -> torch.Tensor:
    """Greedy tokens ``[R, n]`` (n <= ``max_new_tokens``) for question ``ids [R, Q]`` at ``positions [R, Q]``.

    The question is prefilled eagerly into a fixed-capacity view of
    ``cache`` (which is left unchanged), then the answer is decoded by a
    :class:`GraphDecoder`. The caller has switched the model to curdkv's attention.
    """
    fixed = FixedCapacityCache.from_cache(cache, ids.shape[1] + max_new_tokens)
    out = forward_with_cache(model, fixed, input_ids=ids, position_ids=positions, use_cache=True, logits_to_keep=1)
    fixed.state.advance(ids.shape[1])
    first = out.logits[:, -1].argmax(-1)
    if max_new_tokens == 1 or bool(torch.isin(first, stop).all()):
        return first[:, None]
    rest = GraphDecoder(model, fixed, first, positions[:, -1] + 1, stop, max_new_tokens - 1, capture, lean).run()
    return torch.cat([first[:, None], rest], dim=1)
