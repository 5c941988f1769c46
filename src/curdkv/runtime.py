"""When compression happens: during prefill, or from one captured prefill.

Two paths keep exactly the same tokens, because compressing layer l after
its prefill attention does not change what layer l+1 sees:

- :func:`compress` compresses each layer's cache right after that layer's
  prefill attention (a forward hook), so peak memory never holds the full
  cache of every layer;
- :func:`capture_prefill` runs one full prefill and keeps what presses read,
  then :meth:`PrefillCapture.build_cache` builds a compressed cache for any
  press and ratio without running the model again (the sweep path).
"""

from __future__ import annotations

import contextlib
import functools

import torch
from transformers import DynamicCache

from .attention import QueryRecorder, recording_queries, using_curdkv_attention
from .overlap import SideStream, empty_head_message, first_problem, layer_problems
from .cache import CompressedCache, CompressedLayer
from .kernels.common import on_kernel_device
from .presses.base import ALL_QUERIES, Press, ScoringView, check_choice, check_int, check_press
from .ragged_layer import MaskedLayer, RaggedLayer
from .selection import NaNScores, gather_kv_tokens, select_adaptive, select_uniform
from .transformers_compat import TESTED_TRANSFORMERS, TRANSFORMERS_VERSION, find_cache, forward_with_cache

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def attention_modules(model) -> list[torch.nn.Module]:
    """The self-attention module of every decoder layer, in order."""
    check_model(model)
    return [layer.self_attn for layer in model.model.layers]


def check_model(model) -> None:
    """Raise a clear error for models the runtime cannot compress."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"unsupported architecture {model_type!r}: model must be a causal LM of type {list(SUPPORTED_MODEL_TYPES)}"
        )
    layer_types = getattr(config, "layer_types", None) or []
    sliding = any(t != "full_attention" for t in layer_types)
    if model_type == "mistral" and getattr(config, "sliding_window", None) is not None:
        sliding = True
    if sliding:
        raise ValueError(
            "unsupported attention: the model uses sliding-window layers; curdkv compresses full-attention caches "
            "(set config.sliding_window=None / use_sliding_window=False to run it with full attention)"
        )
    if not hasattr(getattr(model, "model", None), "layers"):
        raise ValueError(f"unsupported model class {type(model).__name__}: expected model.model.layers")


LAYOUTS = ("dense", "ragged", "masked")


def num_layers(module) -> int:
    """Decoder layers of the model an attention module belongs to (1 without a config)."""
    return int(getattr(getattr(module, "config", None), "num_hidden_layers", 1) or 1)


def layer_scores(
    press: Press, keys, values, queries, module, layer_idx: int, positions=None, pseudo_queries=None
) -> torch.Tensor:
    """The press's scores ``[B, H_kv, N]`` for one layer, shape-checked."""
    view = ScoringView(keys=keys, values=values, queries=queries, module=module, layer_idx=layer_idx,
                       positions=positions, pseudo_queries=pseudo_queries)
    scores = press.score(view)
    if tuple(scores.shape) != tuple(keys.shape[:3]):
        raise ValueError(
            f"{type(press).__name__}.score returned shape {tuple(scores.shape)}, expected {tuple(keys.shape[:3])}"
        )
    return scores


def compress_states(press: Press, keys, values, queries, module, layer_idx: int):
    """Keep a uniform press's choice of tokens: returns ``(kept_keys, kept_values, evicted)``.

    keys, values: ``[B, H_kv, N, D]``; queries: ``[B, H, W, D]`` or ``None``.
    """
    layer = compress_layer(press, keys, values, queries, module, layer_idx, "dense")
    return layer.keys, layer.values, layer.evicted


def is_head_adaptive(press: Press) -> bool:
    return bool(press.head_adaptive)


def fast_ragged(keys: torch.Tensor) -> bool:
    """Whether the ragged layout has its fast kernel here (CUDA + Triton).

    There, uniform presses use it too: appended tokens go into a preallocated
    tail instead of re-concatenating the whole kept cache at every decoding
    step, and attention reads the kept tokens once. On CPU the dense layout
    with PyTorch's sdpa is faster than the ragged reference.
    """
    if not on_kernel_device(keys):
        return False
    from .kernels.ragged_attention import triton_available

    return triton_available()


def _nan_report(press: Press, scores, layer_idx: int, keys, values, queries) -> str:
    """Which press, layer and heads produced NaN scores, and whether what it read was finite."""
    bad = torch.isnan(scores)
    heads = sorted({int(h) for h in bad.nonzero()[:, 1].tolist()})
    inputs = ", ".join(f"{name} {'finite' if bool(torch.isfinite(t).all()) else 'NOT finite'}"
                       for name, t in (("keys", keys), ("values", values), ("queries", queries)) if t is not None)
    return (f"{press!r} returned {int(bad.sum())} NaN scores at layer {layer_idx}, KV heads {heads}, "
            f"over {keys.shape[2]} tokens ({inputs})")


def compress_layer(
    press: Press, keys, values, queries, module, layer_idx: int, layout: str | None = None,
    scores: torch.Tensor | None = None, n_keep: int | None = None, problems: list | None = None,
):
    """One layer's compressed cache: a :class:`CompressedLayer`, :class:`RaggedLayer` or :class:`MaskedLayer`.

    ``layout``: ``"dense"`` (uniform presses; their default on CPU),
    ``"ragged"`` (each head its own kept tokens; the default for head-adaptive
    presses, and for every press on CUDA with Triton) or ``"masked"`` (everything stored, evicted entries hidden: the
    reference layout, which saves no memory). ``scores`` and ``n_keep``
    (tokens per head) default to the press's own at this layer.
    ``problems``: on CUDA, a list to append this layer's checks to (NaN
    scores, heads left empty) instead of reading them back here
    (:mod:`curdkv.overlap`); the caller raises them later.
    """
    adaptive = is_head_adaptive(press)
    layout = layout or ("ragged" if adaptive or fast_ragged(keys) else "dense")
    check_choice("layout", layout, LAYOUTS)
    if layout == "dense" and adaptive:
        raise ValueError(f"layout must be 'ragged' or 'masked' for the head-adaptive press {press.name!r}, got 'dense'")
    n = keys.shape[2]
    if n == 0:
        raise ValueError("the context is empty: there is nothing to compress")
    if n_keep is None:
        n_keep = press.layer_keep(n, layer_idx, num_layers(module))
    if n_keep >= n:
        return CompressedLayer.from_states(keys, values, 0)
    if scores is None:
        scores = layer_scores(press, keys, values, queries, module, layer_idx)
    # On the GPU the checks wait until the layer's selection and copies are
    # queued: reading a flag earlier would drain the queue mid-layer and leave
    # the GPU idle while the host launches the rest.
    deferred = on_kernel_device(keys)
    chosen = select_tokens(press, keys, values, queries, module, layer_idx, scores=scores, n_keep=n_keep,
                           check_nan=not deferred)
    layer, empty_heads = _layer_from_choice(chosen, keys, values, layout, adaptive, n_keep)
    if deferred and problems is not None:
        problems.append(layer_problems(press, layer_idx, scores, empty_heads))
        return layer
    if deferred and bool(torch.isnan(scores).any()):  # on CPU, select_tokens refused NaN already
        raise ValueError(_nan_report(press, scores, layer_idx, keys, values, queries))
    if empty_heads is not None and bool(empty_heads.any()):
        raise ValueError(empty_head_message(layer_idx))
    return layer


def _layer_from_choice(chosen: torch.Tensor, keys, values, layout: str, adaptive: bool, n_keep: int):
    """The layer keeping ``chosen`` (sorted indices, or a head-adaptive keep mask), and which heads
    kept nothing (``[B, H_kv]`` bool on the device; ``None`` where every head keeps the same count)."""
    n = keys.shape[2]
    if adaptive:
        keep = chosen
    elif layout == "dense":
        kept_keys, kept_values = gather_kv_tokens(keys, values, chosen)
        return CompressedLayer.from_states(kept_keys, kept_values, n - chosen.shape[-1]), None
    elif layout == "ragged":
        return RaggedLayer.from_dense(*gather_kv_tokens(keys, values, chosen), n), None
    else:
        keep = torch.zeros(keys.shape[:3], dtype=torch.bool, device=keys.device).scatter_(-1, chosen, True)
    if layout == "masked":
        return MaskedLayer.from_mask(keys, values, keep), keep.sum(-1) == 0
    # Only a head-adaptive selection gets here, and it keeps exactly its budget
    # per batch element: the packed size is known without reading a count back.
    layer = RaggedLayer.from_mask(keys, values, keep, total=keys.shape[0] * keys.shape[1] * n_keep)
    return layer, layer.empty_heads()


def select_tokens(
    press: Press, keys, values, queries, module, layer_idx: int,
    scores: torch.Tensor | None = None, n_keep: int | None = None, positions: torch.Tensor | None = None,
    check_nan: bool = True,
) -> torch.Tensor:
    """The press's choice at one layer: sorted kept indices ``[B, H_kv, k]`` for a uniform
    press, a keep mask ``[B, H_kv, N]`` for a head-adaptive one.

    ``n_keep`` (tokens per head) defaults to the press's budget at this layer;
    ``positions`` are the cached tokens' RoPE positions when not ``0 .. N-1``.
    """
    n = keys.shape[2]
    if n == 0:
        raise ValueError("the context is empty: there is nothing to compress")
    if n_keep is None:
        n_keep = press.layer_keep(n, layer_idx, num_layers(module))
    if scores is None:
        scores = layer_scores(press, keys, values, queries, module, layer_idx, positions)
    sinks, recent = press.protected_sinks, press.protected_recent
    try:
        if is_head_adaptive(press):
            return select_adaptive(scores, n_keep, press.alpha, sinks, recent, check_nan)
        return select_uniform(scores, n_keep, sinks, recent, check_nan)
    except NaNScores:
        raise ValueError(_nan_report(press, scores, layer_idx, keys, values, queries)) from None


def kept_mask(press: Press, keys, values, queries, module, layer_idx: int) -> torch.Tensor:
    """Which context tokens each KV head keeps at one layer: bool ``[B, H_kv, N]``."""
    if press.layer_keep(keys.shape[2], layer_idx, num_layers(module)) >= keys.shape[2]:
        return torch.ones(keys.shape[:3], dtype=torch.bool, device=keys.device)
    chosen = select_tokens(press, keys, values, queries, module, layer_idx)
    if chosen.dtype == torch.bool:
        return chosen
    return torch.zeros(keys.shape[:3], dtype=torch.bool, device=keys.device).scatter_(-1, chosen, True)


def _refuse_padding(args, kwargs) -> None:
    mask = kwargs.get("attention_mask")
    if mask is None and len(args) > 1 and isinstance(args[1], torch.Tensor):
        mask = args[1]
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and not bool(mask.all()):
        raise ValueError(
            "attention_mask has padding: curdkv compresses batches of equal-length contexts; "
            "run padded sequences one at a time"
        )


# id() of the models inside a compress() block: a second compression of the same prefill would
# cut an already compressed cache and count its evicted tokens twice.
_compressing: set[int] = set()


def refuse_inside_compress(model, what: str) -> None:
    """Raise when ``model`` is inside a :func:`compress` block (``what`` names the caller)."""
    if id(model) in _compressing:
        raise RuntimeError(
            f"{what} inside curdkv.compress(...) on the same model would compress its prefill twice and "
            "corrupt the cache's logical length; leave the compress() block first"
        )


class _CompressionHooks:
    """The hooks of one :func:`compress` block, and what they saw in the model's outermost forward pass.

    The layers that ran a first prefill are known from curdkv's attention
    function (``recorder.calls``), the cache from the hooked forwards'
    arguments by its type (:mod:`curdkv.transformers_compat`): neither depends on what
    transformers names its keywords. When the outermost forward pass ends,
    :meth:`verify` raises if a layer that should have been compressed was not.
    """

    def __init__(self, press: Press, layout, modules, recorder: QueryRecorder, whole_prefill: bool = False,
                 side: SideStream | None = None, budget=None):
        self.press, self.layout, self.modules, self.recorder = press, layout, modules, recorder
        self.whole_prefill, self.side, self.budget = whole_prefill, side, budget
        self.depth = 0  # nested forwards (lookahead decoding inside the hooks) are curdkv's own
        # Layers the hooks compressed in this forward: the tokens per head each holds under a
        # decode budget, else None.
        self.handled: dict[int, int | None] = {}

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

    def after_attention(self, module, args, kwargs, output) -> None:
        if self.depth > 1:
            return
        idx = module.layer_idx
        call = self.recorder.calls.get(idx)
        if call is None:
            raise self.failure(idx, "its attention did not run through curdkv's attention function")
        new_tokens, attended = call
        if self.budget is None and new_tokens != attended:
            return  # not a first prefill: tokens appended to an existing cache are never evicted
        cache = find_cache(kwargs, args)
        if cache is None:
            raise self.failure(idx, "no transformers Cache was among the attention module's arguments "
                                    "(a forward with use_cache=False holds no cache to compress)")
        if self.budget is not None:
            self.handled[idx] = self.budget.after_attention(module, cache, new_tokens)
            return
        layer = cache.layers[idx]
        keys, values = layer.keys, layer.values
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

    def after_forward(self, model, args, kwargs, output) -> None:
        try:
            # ``output`` is None when the forward raised (the hook is always called, to keep depth right).
            if self.depth == 1 and output is not None:
                if self.side is not None:
                    self.side.finish()
                if self.whole_prefill:
                    self._compress_whole_prefill(model, args, kwargs, output)
                self.verify()
        finally:
            self.depth -= 1

    def _first_prefill_layers(self) -> list[int]:
        return [i for i, (new, attended) in sorted(self.recorder.calls.items()) if new == attended]

    def _compress_whole_prefill(self, model, args, kwargs, output) -> None:
        """Every layer at once, after a first prefill (presses with ``needs_full_prefill`` or lookahead)."""
        first = self._first_prefill_layers()
        if not first:
            return
        cache = find_cache(kwargs, args, output)
        if cache is None:
            raise self.failure(first[0], "no transformers Cache was among the model's arguments or outputs")
        n = self.recorder.calls[first[0]][0]
        queries = [self.recorder.pop(i) for i in range(len(self.modules))]
        layers = [cache.layers[i] for i in range(len(self.modules))]
        ids = kwargs.get("input_ids", args[0] if args else None)
        capture = PrefillCapture(
            [layer.keys for layer in layers], [layer.values for layer in layers], queries, self.modules, n,
            model, output.logits[:, -1].argmax(-1), ids if isinstance(ids, torch.Tensor) else None,
        )
        for i, layer in enumerate(capture.build_cache(self.press, self.layout).layers):
            cache.layers[i] = layer
            self.handled[i] = None

    def verify(self) -> None:
        """Raise if a layer that ran a first prefill (or, with a decode budget, any layer) was left as it was."""
        for i in range(len(self.modules)):
            if i not in self.recorder.calls:
                raise self.failure(i, "its attention did not run through curdkv's attention function")
        due = sorted(self.recorder.calls) if self.budget is not None else self._first_prefill_layers()
        for i in due:
            if i not in self.handled:
                raise self.failure(i, "the compression hook never saw its cache")
            if self.budget is not None and self.handled[i] > self.budget.max_cache_tokens:
                raise self.failure(
                    i, f"it holds {self.handled[i]} tokens per head, more than max_cache_tokens="
                       f"{self.budget.max_cache_tokens}")


@contextlib.contextmanager
def compress(
    model, press: Press, layout: str | None = None, max_cache_tokens: int | None = None, overlap: bool = True
):
    """Compress the KV cache of every prefill run inside the block.

    >>> with curdkv.compress(model, curdkv.CurDKVPress(compression_ratio=0.5)):
    ...     out = model.generate(input_ids, max_new_tokens=32)

    Each layer's cache is compressed right after that layer's prefill
    attention; tokens generated afterwards are appended and never evicted,
    unless ``max_cache_tokens`` is set: then every layer is held at that many
    tokens per KV head for the whole generation (:mod:`curdkv.decoding`).
    Presses that need the whole prefill first (dynamic layer budgets, lookahead
    queries) compress every layer when the prefill's forward pass ends.
    Hooks and the attention switch are removed on exit, also after an error.
    A ratio of 0 changes nothing. ``layout``: see :func:`compress_layer`.

    When a forward pass ends, a ``RuntimeError`` names any layer whose first
    prefill was not compressed (or, with ``max_cache_tokens``, any layer that
    holds more): a compression that did not happen is never silent. Blocks do
    not nest on one model.

    ``overlap`` (CUDA): each layer is compressed on a second stream while the
    next layers' prefill runs (:mod:`curdkv.overlap`), which hides most of
    the compression time; the kept tokens are the same. Problems it finds
    (NaN scores) are then raised when the prefill's forward pass ends rather
    than at the layer; ``overlap=False`` compresses on the prefill's stream
    and checks each layer at once.
    """
    check_press(press)
    if layout is not None:
        check_choice("layout", layout, LAYOUTS)
    if not isinstance(overlap, bool):
        raise ValueError(f"overlap must be True or False, got {overlap!r}")
    modules = attention_modules(model)
    refuse_inside_compress(model, "curdkv.compress(...)")
    if max_cache_tokens is not None:
        from .decoding import DecodeBudget

        if layout not in (None, "dense"):
            raise ValueError(f"layout must be 'dense' (or None) with max_cache_tokens, got {layout!r}")
        recorder = QueryRecorder(press.query_window, rolling=True)
        hooks = _CompressionHooks(press, layout, modules, recorder,
                                  budget=DecodeBudget(press, max_cache_tokens, recorder))
    elif press.compression_ratio == 0.0:
        yield
        return
    elif press.needs_full_prefill or press.lookahead_tokens:
        hooks = _CompressionHooks(press, layout, modules, QueryRecorder(press.query_window), whole_prefill=True)
    else:
        side = SideStream() if overlap and torch.cuda.is_available() else None
        hooks = _CompressionHooks(press, layout, modules, QueryRecorder(press.query_window), side=side)
    handles = []
    _compressing.add(id(model))
    try:
        with using_curdkv_attention(model), recording_queries(modules, hooks.recorder):
            handles.append(model.register_forward_pre_hook(hooks.before_forward, with_kwargs=True))
            handles.append(model.register_forward_hook(hooks.after_forward, with_kwargs=True, always_call=True))
            if not hooks.whole_prefill:
                for m in modules:
                    handles.append(m.register_forward_hook(hooks.after_attention, with_kwargs=True))
            yield
    finally:
        _compressing.discard(id(model))
        for h in handles:
            h.remove()
        if hooks.side is not None:
            hooks.side.finish(check=False)


class PrefillCapture:
    """One full prefill's keys, values and window queries, per layer.

    ``keys[l]``/``values[l]``: ``[B, H_kv, N, D]``; ``queries[l]``: ``[B, H, W, D]``.
    ``model`` and ``next_token`` (``[B]``, the greedy token after the context)
    are what presses with lookahead tokens decode from, ``input_ids`` what a
    press calibrating its ratio to the context reads; ``None`` when not kept.
    """

    def __init__(self, keys, values, queries, modules, seq_len: int, model=None, next_token=None, input_ids=None):
        self.keys, self.values, self.queries = keys, values, queries
        self.modules = modules
        self.seq_len = seq_len
        self.model, self.next_token, self.input_ids = model, next_token, input_ids
        # Scores of presses whose scores do not depend on the ratio, per (press at ratio 0, layer):
        # a sweep over ratios scores each press once.
        self._scores: dict[tuple[str, int], torch.Tensor] = {}

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    @functools.cached_property
    def context_nll(self) -> torch.Tensor | None:
        """Token-averaged NLL of the context under the model, ``[B]`` (what calibrated presses read).

        One forward pass the first time it is read, shared by every calibrated
        configuration built from this capture; ``None`` without model or ids.
        """
        if self.model is None or self.input_ids is None:
            return None
        from .presses.calibration import context_nll

        return context_nll(self.model, self.input_ids)

    def nbytes(self) -> int:
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in zip(self.keys, self.values))

    def window_queries(self, press: Press) -> list[torch.Tensor | None]:
        """Each layer's last ``press.query_window`` queries, checked against what was recorded."""
        out = []
        for q in self.queries:
            recorded = 0 if q is None else q.shape[2]
            # A context shorter than the window is reported by selection, which names both lengths.
            if recorded < min(press.query_window, self.seq_len):
                wanted = "the queries of every context token" if press.query_window >= ALL_QUERIES else \
                    f"{press.query_window} window queries"
                raise ValueError(
                    f"{type(press).__name__} needs {wanted}; capture_prefill recorded {recorded} "
                    f"(pass capture_prefill(..., query_window=press.query_window))"
                )
            out.append(q[:, :, -press.query_window :] if q is not None and press.query_window else q)
        return out

    def build_cache(self, press: Press | None, layout: str | None = None) -> CompressedCache:
        """A compressed cache for ``press`` (``None``: the full cache, shared, not copied).

        ``layout``: see :func:`compress_layer`.
        """
        if press is None:
            return CompressedCache.from_layers(
                [CompressedLayer.from_states(k, v, 0) for k, v in zip(self.keys, self.values)]
            )
        check_press(press)
        queries = self.window_queries(press)
        if press.needs_full_prefill:
            # Budgets across layers need every layer's scores before any layer is cut.
            scores = self.scores(press, queries)
            keeps = press.layer_keeps(scores, self.seq_len)
        else:
            keeps = [press.layer_keep(self.seq_len, i, self.num_layers) for i in range(self.num_layers)]
            nothing_evicted = all(k >= self.seq_len for k in keeps)
            scores = [None] * self.num_layers if nothing_evicted else self.scores(press, queries)
        inputs = list(zip(self.keys, self.values, queries, self.modules, scores, keeps))
        # On the GPU every layer's checks are read back once, at the end: a read back per layer
        # would stop the host from queueing the next layer while the GPU works on this one.
        problems = [] if self.keys and on_kernel_device(self.keys[0]) else None
        layers = [compress_layer(press, k, v, q, m, i, layout, scores=s, n_keep=n_keep, problems=problems)
                  for i, (k, v, q, m, s, n_keep) in enumerate(inputs)]
        found = first_problem(problems or [])
        if found is not None:
            # Again with the checks at once, for the error that says which inputs were finite.
            k, v, q, m, s, n_keep = inputs[found[0].layer_idx]
            compress_layer(press, k, v, q, m, found[0].layer_idx, layout, scores=s, n_keep=n_keep)
            raise ValueError(found[1])
        return CompressedCache.from_layers(layers)

    def forget_scores(self) -> None:
        """Drop the scores kept for reuse across ratios (timings of a whole build need this)."""
        self._scores.clear()

    def scores(self, press: Press, queries: list) -> list[torch.Tensor]:
        """Every layer's scores for ``press``, reused across ratios where they do not depend on the ratio."""
        key = None if press.scores_depend_on_ratio else press.with_ratio(0.0).describe()
        if key is not None and (key, 0) in self._scores:
            return [self._scores[(key, i)] for i in range(self.num_layers)]
        pseudo = [None] * self.num_layers
        if press.lookahead_tokens:
            from .lookahead import pseudo_queries

            pseudo = pseudo_queries(self, press)
        out = [
            layer_scores(press, k, v, q, m, i, pseudo_queries=p)
            for i, (k, v, q, m, p) in enumerate(zip(self.keys, self.values, queries, self.modules, pseudo))
        ]
        if key is not None:
            self._scores.update({(key, i): s for i, s in enumerate(out)})
        return out


@torch.no_grad()
def capture_prefill(model, input_ids: torch.Tensor, query_window: int = 64) -> PrefillCapture:
    """Run one full prefill of ``input_ids`` ``[B, N]`` and keep what presses read."""
    modules = attention_modules(model)
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError("input_ids must be a [batch, seq_len] tensor of token ids")
    if input_ids.shape[1] == 0:
        raise ValueError("the context is empty: input_ids has no tokens")
    check_int("query_window", query_window, 0)
    refuse_inside_compress(model, "capture_prefill()")
    recorder = QueryRecorder(min(query_window, input_ids.shape[1]))
    cache = DynamicCache()
    with using_curdkv_attention(model), recording_queries(modules, recorder):
        out = forward_with_cache(model, cache, input_ids=input_ids, use_cache=True, logits_to_keep=1)
    n = input_ids.shape[1]
    if len(cache.layers) != len(modules) or any(layer.get_seq_length() != n for layer in cache.layers):
        raise RuntimeError(
            f"capture_prefill: the model did not fill the cache it was handed ({len(cache.layers)} of "
            f"{len(modules)} layers, expected {n} tokens each) under transformers {TRANSFORMERS_VERSION}"
        )
    keys = [cache.layers[i].keys for i in range(len(modules))]
    values = [cache.layers[i].values for i in range(len(modules))]
    queries = [recorder.queries.get(i) for i in range(len(modules))]
    next_token = out.logits[:, -1].argmax(-1)
    return PrefillCapture(keys, values, queries, modules, input_ids.shape[1], model, next_token, input_ids)
