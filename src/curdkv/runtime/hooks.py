"""Compression during prefill: :func:`compress` and the hook objects it installs.

Each layer's cache is compressed right after that layer's prefill attention
(a forward hook), so peak memory never holds the full cache of every layer.
The sweep path (:mod:`curdkv.runtime.capture`) keeps the same tokens from one
captured prefill, because compressing layer l does not change what layer l+1
sees.
"""

from __future__ import annotations

import contextlib

import torch

from ..attention.function import using_curdkv_attention
from ..attention.recording import QueryRecorder, recording_queries
from ..presses.base import Press, check_choice, check_press
from ..transformers_compat import TESTED_TRANSFORMERS, TRANSFORMERS_VERSION, find_cache
from .capture import PrefillCapture
from .decoding import DecodeBudget
from .graph_decode import resolve_cuda_graph
from .graph_generate import GraphGenerate
from .layer import LAYOUTS, compress_layer, layer_scores
from .model import attention_modules, compressing, refuse_inside_compress
from .overlap import SideStream


def _refuse_padding(args, kwargs) -> None:
    mask = kwargs.get("attention_mask")
    if mask is None and len(args) > 1 and isinstance(args[1], torch.Tensor):
        mask = args[1]
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and not bool(mask.all()):
        raise ValueError(
            "attention_mask has padding: curdkv compresses batches of equal-length contexts; "
            "run padded sequences one at a time"
        )


class _Hooks:
    """What every :func:`compress` block installs: a hook before and after the model's forward pass,
    and, where layers are compressed one by one, one after each attention module.

    The layers that ran a first prefill are known from curdkv's attention
    function (``recorder.calls``), the cache from the hooked forwards'
    arguments by its type (:mod:`curdkv.transformers_compat`): neither depends
    on what transformers names its keywords. When the outermost forward pass
    ends, :meth:`verify` raises if a layer that should have been compressed
    was not. Subclasses say what happens after a layer's attention
    (:meth:`after_attention`) and when the forward ends (:meth:`finish`).
    """

    per_layer = True  # whether after_attention is installed on every attention module

    def __init__(self, press: Press, layout, modules, recorder: QueryRecorder):
        self.press, self.layout, self.modules, self.recorder = press, layout, modules, recorder
        self.depth = 0  # nested forwards (lookahead decoding inside the hooks) are curdkv's own
        # Layers the hooks compressed in this forward, with what verify() checks of each.
        self.handled: dict[int, int | None] = {}
        # Set when a replayed decode step served the forward (no attention module runs; nothing is due).
        self.graph_served = False

    def install(self, model) -> list:
        handles = [model.register_forward_pre_hook(self.before_forward, with_kwargs=True),
                   model.register_forward_hook(self.after_forward, with_kwargs=True, always_call=True)]
        if self.per_layer:
            handles += [m.register_forward_hook(self.after_attention, with_kwargs=True) for m in self.modules]
        return handles

    def failure(self, layer_idx: int, reason: str) -> RuntimeError:
        return RuntimeError(
            f"curdkv did not compress layer {layer_idx} with press {self.press.name!r} "
            f"(compression_ratio={self.press.compression_ratio:g}) under transformers {TRANSFORMERS_VERSION}: "
            f"{reason}. curdkv is tested with transformers {TESTED_TRANSFORMERS[0]} to {TESTED_TRANSFORMERS[1]}"
        )

    def before_forward(self, model, args, kwargs) -> None:
        _refuse_padding(args, kwargs)
        self.depth += 1
        if self.depth == 1:
            self.recorder.calls.clear()
            self.handled.clear()
            self.graph_served = False

    def layer_call(self, module) -> tuple[int, int, bool]:
        """``(layer, new tokens, whether this was a first prefill)`` of the attention call that just ran."""
        idx = module.layer_idx
        call = self.recorder.calls.get(idx)
        if call is None:
            raise self.failure(idx, "its attention did not run through curdkv's attention function")
        return idx, call[0], self.recorder.first_prefill(idx)

    def layer_cache(self, idx: int, *sources):
        cache = find_cache(*sources)
        if cache is None:
            raise self.failure(idx, "no transformers Cache was among the forward's arguments "
                                    "(a forward with use_cache=False holds no cache to compress)")
        return cache

    def after_attention(self, module, args, kwargs, output) -> None:
        """Hand the layer to :meth:`prefilled` when its attention just ran a first prefill of the outermost
        forward: tokens appended to an existing cache are never evicted."""
        if self.depth > 1:
            return
        idx, _, first_prefill = self.layer_call(module)
        if first_prefill:
            self.prefilled(module, idx, self.layer_cache(idx, kwargs, args))

    def prefilled(self, module, idx: int, cache) -> None:
        """What happens to layer ``idx`` of ``cache`` right after its first prefill's attention."""
        raise NotImplementedError

    def after_forward(self, model, args, kwargs, output) -> None:
        try:
            # ``output`` is None when the forward raised (the hook is always called, to keep depth right).
            if self.depth == 1 and output is not None:
                self.finish(model, args, kwargs, output)
                self.verify()
        finally:
            self.depth -= 1

    def finish(self, model, args, kwargs, output) -> None:
        """What happens when the outermost forward pass ends, before :meth:`verify`."""

    def close(self) -> None:
        """Release what the block held (called on exit, also after an error)."""

    def due(self) -> list[int]:
        """The layers that must have been compressed in this forward: those that ran a first prefill."""
        return self.recorder.first_prefill_layers()

    def verify(self) -> None:
        """Raise if a layer that is :meth:`due` was left as it was."""
        if self.graph_served:
            return
        for i in range(len(self.modules)):
            if i not in self.recorder.calls:
                raise self.failure(i, "its attention did not run through curdkv's attention function")
        for i in self.due():
            if i not in self.handled:
                raise self.failure(i, "the compression hook never saw its cache")


class _LayerByLayer(_Hooks):
    """Each layer compressed right after its prefill attention, on a second CUDA stream when ``side`` is set."""

    def __init__(self, press: Press, layout, modules, side: SideStream | None):
        super().__init__(press, layout, modules, QueryRecorder(press.query_window))
        self.side = side

    def prefilled(self, module, idx: int, cache) -> None:
        keys, values = cache.layers[idx].keys, cache.layers[idx].values
        queries = self.recorder.pop(idx)
        if self.side is not None and keys.is_cuda:
            compressed = self.side.run(
                lambda problems: compress_layer(self.press, keys, values, queries, module, idx, self.layout,
                                                problems=problems),
                (keys, values, queries), keys.device,
            )
        else:
            compressed = compress_layer(self.press, keys, values, queries, module, idx, self.layout)
        cache.layers[idx] = compressed
        self.handled[idx] = None

    def finish(self, model, args, kwargs, output) -> None:
        if self.side is not None:
            self.side.finish()

    def close(self) -> None:
        if self.side is not None:
            self.side.finish(check=False)


class _WholePrefill(_Hooks):
    """Every layer at once when a first prefill ends, through :meth:`PrefillCapture.build_cache`
    (presses that compress after the prefill: layer budgets from every layer, lookahead queries).
    Where a layer's scores need only that layer, they are computed after its attention."""

    def __init__(self, press: Press, layout, modules, tokenizer=None):
        super().__init__(press, layout, modules, QueryRecorder(press.query_window))
        self.tokenizer = tokenizer
        # A press whose scores need only their own layer (not the model's reconstruction or lookahead
        # passes) is scored right after each layer's attention: the queries it reads, every context
        # query for some, are dropped layer by layer instead of held until the prefill ends.
        self.per_layer = not (press.reconstructs_context or press.lookahead_tokens)
        self.scored: dict[int, torch.Tensor] = {}

    def before_forward(self, model, args, kwargs) -> None:
        super().before_forward(model, args, kwargs)
        if self.depth == 1:
            self.scored.clear()

    def prefilled(self, module, idx: int, cache) -> None:
        layer = cache.layers[idx]
        self.scored[idx] = layer_scores(self.press, layer.keys, layer.values, self.recorder.pop(idx), module, idx)

    def finish(self, model, args, kwargs, output) -> None:
        first = self.due()
        if not first:
            return
        cache = self.layer_cache(first[0], kwargs, args, output)
        n = self.recorder.calls[first[0]][0]
        layers = [cache.layers[i] for i in range(len(self.modules))]
        ids = kwargs.get("input_ids", args[0] if args else None)
        scored = None
        if self.per_layer:
            missing = [i for i in range(len(self.modules)) if i not in self.scored]
            if missing:
                raise self.failure(missing[0], "its prefill attention was never scored")
            scored = (self.press, [self.scored.pop(i) for i in range(len(self.modules))])
        capture = PrefillCapture(
            keys=[layer.keys for layer in layers], values=[layer.values for layer in layers],
            queries=[self.recorder.pop(i) for i in range(len(self.modules))], modules=self.modules, seq_len=n,
            model=model, next_token=output.logits[:, -1].argmax(-1),
            input_ids=ids if isinstance(ids, torch.Tensor) else None, tokenizer=self.tokenizer, scored=scored,
        )
        for i, layer in enumerate(capture.build_cache(self.press, self.layout).layers):
            cache.layers[i] = layer
            self.handled[i] = None

    def close(self) -> None:
        self.scored.clear()


class _DecodeBudget(_Hooks):
    """Every layer held at ``max_cache_tokens`` per head after every forward (:mod:`curdkv.runtime.decoding`)."""

    def __init__(self, press: Press, layout, modules, max_cache_tokens: int):
        super().__init__(press, layout, modules, QueryRecorder(press.query_window, rolling=True))
        self.budget = DecodeBudget(press, max_cache_tokens, self.recorder)

    def after_attention(self, module, args, kwargs, output) -> None:
        if self.depth > 1:
            return
        idx, new_tokens, _ = self.layer_call(module)
        # handled: the tokens per head the layer holds now
        self.handled[idx] = self.budget.after_attention(module, self.layer_cache(idx, kwargs, args), new_tokens)

    def due(self) -> list[int]:
        return sorted(self.recorder.calls)

    def verify(self) -> None:
        super().verify()
        limit = self.budget.max_cache_tokens
        for i in self.due():
            if self.handled[i] > limit:
                raise self.failure(i, f"it holds {self.handled[i]} tokens per head, more than max_cache_tokens={limit}")


@contextlib.contextmanager
def compress(
    model, press: Press, layout: str | None = None, max_cache_tokens: int | None = None, overlap: bool = True,
    cuda_graph: bool | None = None, tokenizer=None,
):
    """Compress the KV cache of every prefill run inside the block.

    >>> with curdkv.compress(model, curdkv.CurDKVPress(compression_ratio=0.5)):
    ...     out = model.generate(input_ids, max_new_tokens=32)

    Each layer's cache is compressed right after that layer's prefill
    attention; tokens generated afterwards are appended and never evicted,
    unless ``max_cache_tokens`` is set: then every layer is held at that many
    tokens per KV head for the whole generation (:mod:`curdkv.runtime.decoding`).
    Presses that need the whole prefill first (dynamic layer budgets, lookahead
    queries) compress every layer when the prefill's forward pass ends.
    Hooks and the attention switch are removed on exit, also after an error.
    A ratio of 0 changes nothing. ``layout``: see :func:`compress_layer`.

    When a forward pass ends, a ``RuntimeError`` names any layer whose first
    prefill was not compressed (or, with ``max_cache_tokens``, any layer that
    holds more): a compression that did not happen is never silent. Blocks do
    not nest on one model.

    ``overlap`` (CUDA): each layer is compressed on a second stream while the
    next layers' prefill runs (:mod:`curdkv.runtime.overlap`), which hides most of
    the compression time; the kept tokens are the same. Problems it finds
    (NaN scores) are then raised when the prefill's forward pass ends rather
    than at the layer; ``overlap=False`` compresses on the prefill's stream
    and checks each layer at once.

    ``cuda_graph`` (CUDA with Triton, the default there): decode steps over
    the compressed cache, as ``model.generate`` runs them, are replayed as a
    CUDA graph (:mod:`curdkv.runtime.graph_generate`); ``False`` runs every
    step through the model's forward. Not with ``max_cache_tokens``, whose
    evictions change the cache at every step.

    ``tokenizer``: what a press that reconstructs the context (KVzip) encodes
    its prompt with; other presses ignore it.
    """
    check_press(press)
    if layout is not None:
        check_choice("layout", layout, LAYOUTS)
    if not isinstance(overlap, bool):
        raise ValueError(f"overlap must be True or False, got {overlap!r}")
    modules = attention_modules(model)
    refuse_inside_compress(model, "curdkv.compress(...)")
    if press.reconstructs_context and tokenizer is None:
        raise ValueError(f"{type(press).__name__} asks the model to repeat the context, which needs the tokenizer: "
                         "curdkv.compress(model, press, tokenizer=tokenizer)")
    graphs = resolve_cuda_graph(cuda_graph, next(model.parameters()).device)
    if graphs and cuda_graph and max_cache_tokens is not None:
        raise ValueError("cuda_graph=True cannot be combined with max_cache_tokens (the cache changes at every step)")
    if max_cache_tokens is not None:
        if layout not in (None, "dense"):
            raise ValueError(f"layout must be 'dense' (or None) with max_cache_tokens, got {layout!r}")
        hooks = _DecodeBudget(press, layout, modules, max_cache_tokens)
    elif press.compression_ratio == 0.0:
        yield
        return
    elif press.compresses_after_prefill:
        hooks = _WholePrefill(press, layout, modules, tokenizer)
    else:
        hooks = _LayerByLayer(press, layout, modules, SideStream() if overlap and torch.cuda.is_available() else None)
    handles = []
    generate = GraphGenerate(model, hooks) if graphs and max_cache_tokens is None else None
    try:
        with compressing(model), using_curdkv_attention(model), recording_queries(modules, hooks.recorder):
            handles = hooks.install(model)
            if generate is not None:
                generate.install()
            yield
    finally:
        if generate is not None:
            generate.remove()
        for h in handles:
            h.remove()
        hooks.close()
