"""The sweep path: one full prefill kept, then a compressed cache for any press and ratio.

:func:`curdkv.capture_prefill` runs the prefill once and keeps what presses read;
:meth:`PrefillCapture.build_cache` compresses it without running the model
again. The tokens kept are those :func:`curdkv.compress` keeps during the
prefill, because compressing layer l does not change what layer l+1 sees.
"""

from __future__ import annotations

import functools

import torch
from transformers import DynamicCache

from ..attention.function import using_curdkv_attention
from ..attention.recording import QueryRecorder, recording_queries
from ..cache.dense import CompressedCache, CompressedLayer
from ..kernels.common import on_kernel_device
from ..presses.base import ALL_QUERIES, Press, check_int, check_press
from ..selection import check_not_empty
from ..transformers_compat import TRANSFORMERS_VERSION, forward_with_cache
from .layer import compress_layer, layer_scores
from .lookahead import pseudo_queries
from .model import attention_modules, refuse_inside_compress
from .nll import context_nll
from .overlap import first_problem
from .reconstruction import reconstruction_scores


class PrefillCapture:
    """One full prefill's keys, values and window queries, per layer.

    ``keys[l]``/``values[l]``: ``[B, H_kv, N, D]``; ``queries[l]``: ``[B, H, W, D]``.
    ``model`` and ``next_token`` (``[B]``, the greedy token after the context)
    are what presses with lookahead tokens decode from, ``model`` and
    ``input_ids`` what :attr:`context_nll` is measured with, and with the
    ``tokenizer`` what a press that reconstructs the context (KVzip) runs;
    ``None`` when not kept.
    """

    def __init__(self, keys, values, queries, modules, seq_len: int, *, model=None, next_token=None,
                 input_ids=None, tokenizer=None, scored: tuple[Press, list[torch.Tensor]] | None = None):
        self.keys, self.values, self.queries = keys, values, queries
        # (press, each layer's scores) computed while the prefill ran; build_cache(press) then reads
        # no queries, which :func:`curdkv.compress` dropped layer by layer.
        self.scored = scored
        self.modules = modules
        self.seq_len = seq_len
        self.model, self.next_token, self.input_ids = model, next_token, input_ids
        self.tokenizer = tokenizer
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
        if self.scored is not None:
            if press is not self.scored[0]:
                raise ValueError(f"this capture holds the scores of {self.scored[0].describe()} alone, "
                                 f"not its queries: it cannot build {press.describe()}")
            queries, scores = [None] * self.num_layers, self.scored[1]
        else:
            queries, scores = self.window_queries(press), None
        if press.needs_full_prefill:
            # Budgets across layers need every layer's scores before any layer is cut.
            if scores is None:
                scores = self.scores(press, queries)
            keeps = press.layer_keeps(scores, self.seq_len)
        else:
            keeps = [press.layer_keep(self.seq_len, i, self.num_layers) for i in range(self.num_layers)]
            nothing_evicted = all(k >= self.seq_len for k in keeps)
            if scores is None:
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
            pseudo = pseudo_queries(self, press)
        rebuilt = reconstruction_scores(self, press) if press.reconstructs_context else [None] * self.num_layers
        out = [
            layer_scores(press, k, v, q, m, i, pseudo_queries=p, reconstruction=r)
            for i, (k, v, q, m, p, r) in enumerate(zip(self.keys, self.values, queries, self.modules, pseudo, rebuilt))
        ]
        if key is not None:
            self._scores.update({(key, i): s for i, s in enumerate(out)})
        return out


@torch.no_grad()
def capture_ids(model, input_ids: torch.Tensor, query_window: int = 64, tokenizer=None) -> PrefillCapture:
    """Run one full prefill of ``input_ids`` ``[B, N]`` and keep what presses read
    (:func:`curdkv.capture_prefill` is the public entry point, which also takes text)."""
    modules = attention_modules(model)
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError("input_ids must be a [batch, seq_len] tensor of token ids")
    check_not_empty(input_ids.shape[1])
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
    return PrefillCapture(keys, values, queries, modules, input_ids.shape[1], model=model, next_token=next_token,
                          input_ids=input_ids, tokenizer=tokenizer)
