"""Query-agnostic answering: compress a context once, ask it many questions.

The context is compressed without seeing any question (the setting of the
CurDKV paper and of kvpress's benchmarks). Questions are appended to the
compressed cache with RoPE positions continuing after the *original* context
length, answered greedily, and removed again, so every question sees the
same compressed cache.
"""

from __future__ import annotations

import warnings

import torch

from .attention.function import using_curdkv_attention
from .cache.dense import CompressedCache
from .cache.fixed import FixedCapacityCache
from .cache.stack import stack_contexts
from .models import chat_parts
from .presses.base import Press, check_press
from .runtime.capture import PrefillCapture, capture_ids
from .runtime.graph_decode import (
    GraphDecoder, answer_on_graph, answer_rows_on_graph, decodable_on_graph, resolve_cuda_graph,
)
from .runtime.hooks import compress
from .runtime.model import attention_modules, refuse_inside_compress
from .transformers_compat import forward_with_cache

def encode_context(tokenizer, context: str, device=None) -> torch.Tensor:
    """Token ids ``[1, N]`` of the chat prefix followed by ``context``."""
    if not isinstance(context, str) or not context.strip():
        raise ValueError("context must be a non-empty string")
    prefix, _ = chat_parts(tokenizer)
    ids = tokenizer(prefix + context, add_special_tokens=not prefix, return_tensors="pt").input_ids
    return ids.to(device) if device is not None else ids


def encode_question(
    tokenizer, question: str, answer_prefix: str | None = None, device=None, separator: str = "\n"
) -> torch.Tensor:
    """Token ids ``[1, Q]`` of ``separator``, the question, the end of the chat turn and the answer prefix.

    Benchmarks whose question already carries its own separation from the
    context (their ``context + question`` is the original prompt) pass ``separator=""``.
    """
    if not isinstance(question, str) or not question.strip():
        raise ValueError("question must be a non-empty string")
    if answer_prefix is not None and not isinstance(answer_prefix, str):
        raise ValueError(f"answer_prefix must be a string or None, got {answer_prefix!r}")
    if not isinstance(separator, str):
        raise ValueError(f"separator must be a string, got {separator!r}")
    _, suffix = chat_parts(tokenizer)
    text = separator + question + suffix + (answer_prefix or "")
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    return ids.to(device) if device is not None else ids


def _stop_ids(model, tokenizer) -> set[int]:
    ids = set()
    for source in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif source is not None:
            ids.update(int(i) for i in source)
    return ids


def _stop_list(model, tokenizer) -> list[int]:
    """The end token ids, sorted, as decoding compares them on the device (``[-1]``, matching nothing, if none)."""
    return sorted(_stop_ids(model, tokenizer)) or [-1]


class CompressedContext:
    """A context prefilled (and compressed) once; :meth:`ask` questions against it."""

    def __init__(self, model, tokenizer, cache: CompressedCache, context_length: int, press: Press | None):
        self.model, self.tokenizer, self.cache = model, tokenizer, cache
        self.context_length = context_length
        self.press = press

    @classmethod
    def from_capture(
        cls, model, tokenizer, capture: PrefillCapture, press: Press | None, layout: str | None = None
    ) -> "CompressedContext":
        """The sweep path: a compressed context built from one captured prefill, without running the model."""
        return cls(model, tokenizer, capture.build_cache(press, layout), capture.seq_len, press)

    def nbytes(self) -> int:
        """Bytes of the context's keys and values held."""
        return self.cache.nbytes()

    def ask(self, question: str, max_new_tokens: int = 32, answer_prefix: str | None = None, *,
            cuda_graph: bool | None = None) -> str:
        """Answer ``question`` greedily; the compressed cache is left as it was.

        ``cuda_graph``: decode by replaying a CUDA graph (``None``: on CUDA
        with Triton; ``False``: never), see :mod:`curdkv.runtime.graph_decode`.
        """
        return answer_greedily(
            self.model, self.tokenizer, self.cache, self.context_length, question, max_new_tokens, answer_prefix,
            cuda_graph=cuda_graph,
        )[0]


@torch.no_grad()
def answer_greedily(
    model, tokenizer, cache, context_length: int, question: str, max_new_tokens: int = 32,
    answer_prefix: str | None = None, separator: str = "\n", *, cuda_graph: bool | None = None,
) -> list[str]:
    """Greedy answers to one question for every batch row of ``cache``; the cache is restored afterwards.

    Rows may hold different compressions of the same context (see
    :func:`curdkv.cache.stack.stack_caches`); each stops at its own end token.
    On CUDA the answer is decoded by CUDA-graph replay unless ``cuda_graph=False``.
    """
    check_max_new_tokens(max_new_tokens)
    first = cache.layers[0]
    device = first.keys.device
    rows = first.keys.shape[0]
    ids = encode_question(tokenizer, question, answer_prefix, device, separator).expand(rows, -1)
    stop = torch.tensor(_stop_list(model, tokenizer), device=device)
    if _graph_decoding(cuda_graph, device, cache, max_new_tokens):
        positions = torch.arange(context_length, context_length + ids.shape[1], device=device)[None].expand(rows, -1)
        with using_curdkv_attention(model):
            tokens = answer_on_graph(model, cache, ids, positions, stop, max_new_tokens)
        stop_set = set(stop.tolist())
        return [_answer_text(tokenizer, row, stop_set) for row in tokens.tolist()]
    snapshot = cache.snapshot()
    position = context_length
    generated = []
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    try:
        with using_curdkv_attention(model):
            for _ in range(max_new_tokens):
                positions = torch.arange(position, position + ids.shape[1], device=device)[None].expand(rows, -1)
                out = forward_with_cache(
                    model, cache, input_ids=ids, position_ids=positions, use_cache=True, logits_to_keep=1
                )
                position += ids.shape[1]
                token = out.logits[:, -1].argmax(-1)
                done |= torch.isin(token, stop)
                generated.append(token)
                if bool(done.all()):
                    break
                ids = token[:, None]
    finally:
        cache.restore(snapshot)
    stop_set = set(stop.tolist())
    return [_answer_text(tokenizer, row, stop_set) for row in torch.stack(generated, dim=1).tolist()]


def check_max_new_tokens(max_new_tokens) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")


def _graph_decoding(cuda_graph, device, cache, max_new_tokens: int) -> bool:
    """Whether to decode by graph replay: asked for (or possible, by default), worth it, and the cache allows it."""
    if not resolve_cuda_graph(cuda_graph, device):
        return False
    if not decodable_on_graph(cache):
        if cuda_graph:
            raise ValueError("cuda_graph=True needs a cache in the dense or ragged layout (not masked)")
        return False
    return max_new_tokens > 1


def _answer_text(tokenizer, tokens: list[int], stop: set[int]) -> str:
    """The answer a row's generated tokens spell, up to its first end token."""
    kept = []
    for token in tokens:
        if token in stop:
            break
        kept.append(token)
    return tokenizer.decode(kept, skip_special_tokens=True)


# Feeding the questions through the replayed step costs the longest question's length in batched
# steps; prefilling them costs one eager forward per row. On the H200 (random Llama-3.1-8B, 64 rows
# of 4K-64K tokens; results/decode/mixed-bf16.json) a row's question prefill took 153 ms and one
# batched step 52 ms, so feeding wins while the longest question has fewer than about 3 tokens per row.
QUESTION_TOKENS_FED_PER_ROW = 3


@torch.no_grad()
def ask_many(requests, max_new_tokens: int = 32, answer_prefix: str | None = None, *,
             cuda_graph: bool | None = None) -> list[str]:
    """Answer many ``(context, question)`` pairs in one decode batch: the serving case.

    ``requests``: pairs of a :class:`CompressedContext` (from :func:`prefill`
    or :meth:`CompressedContext.from_capture`; any press, ratio and length) and
    a question, or triples that add the request's own answer prefix (else
    ``answer_prefix`` applies). Each question is prefilled on its own context, which folds it
    into that row; then every row decodes one token per step in one batch of
    a ragged cache (:func:`curdkv.cache.stack.stack_contexts`), each at its
    own positions, and a row that has finished leaves the batch, so it costs
    no more reads. Every answer is the one ``context.ask(question)`` gives
    (greedy), up to rounding near-ties of the batched attention. The contexts'
    caches are left as they were. On CUDA the batch decodes by CUDA-graph
    replay (``cuda_graph=False`` to decode eagerly); a finished row then
    stays in the batch but its attention reads nothing, and where that is
    cheaper (:data:`QUESTION_TOKENS_FED_PER_ROW`) the questions are not
    prefilled one by one but read by the replayed step itself, one token of
    every row's question per step (:func:`answer_rows_on_graph`).
    """
    check_max_new_tokens(max_new_tokens)
    requests = checked_requests(requests)
    model, tokenizer = requests[0][0].model, requests[0][0].tokenizer
    device = next(model.parameters()).device
    graph = all(_graph_decoding(cuda_graph, device, ctx.cache, max_new_tokens) for ctx, *_ in requests)
    questions = encoded_questions(requests, answer_prefix, device)
    if graph and max(q.shape[1] for q in questions) <= QUESTION_TOKENS_FED_PER_ROW * len(requests):
        starts = torch.tensor([ctx.context_length for ctx, *_ in requests], device=device)
        stop = _stop_list(model, tokenizer)
        with using_curdkv_attention(model):
            rows = answer_rows_on_graph(model, stack_contexts([ctx.cache for ctx, *_ in requests]),
                                        [q[0] for q in questions], starts, torch.tensor(stop, device=device),
                                        max_new_tokens)
        return [_answer_text(tokenizer, row, set(stop)) for row in rows]
    cache, token, position = fold_questions(requests, answer_prefix, questions=questions)
    return decode_rows(model, tokenizer, cache, token, position, max_new_tokens, cuda_graph=graph)


def encoded_questions(requests, answer_prefix: str | None, device) -> list[torch.Tensor]:
    """Each request's question with its answer prefix (its own, else ``answer_prefix``) as ids ``[1, Q]``."""
    tokenizer = requests[0][0].tokenizer
    return [encode_question(tokenizer, question, own[0] if own else answer_prefix, device)
            for _, question, *own in requests]


def checked_requests(requests) -> list[tuple]:
    """``requests`` of :func:`ask_many` as a list, refused unless they are (context, question[, prefix]) of one model."""
    requests = list(requests)
    if not requests:
        raise ValueError("requests must hold at least one (context, question) pair")
    for item in requests:
        if not (isinstance(item, tuple) and len(item) in (2, 3) and isinstance(item[0], CompressedContext)):
            raise TypeError(f"requests must be (CompressedContext, question[, answer_prefix]) tuples, got {item!r:.80}")
    model = requests[0][0].model
    if any(item[0].model is not model for item in requests):
        raise ValueError("every context of ask_many must come from the same model")
    return requests


@torch.no_grad()
def fold_questions(requests, answer_prefix: str | None = None, *, questions: list[torch.Tensor] | None = None):
    """:func:`ask_many`'s first half: each question prefilled on its own context, the rows stacked.

    Returns the ragged cache (one row per request, the question folded into
    its context), each row's first answer token ``[R]`` and the position of
    that token ``[R]``. The contexts' caches are left as they were.
    ``questions``: the requests' :func:`encoded_questions`, where the caller has them.
    """
    requests = checked_requests(requests)
    model = requests[0][0].model
    device = next(model.parameters()).device
    if questions is None:
        questions = encoded_questions(requests, answer_prefix, device)
    prefilled, first_tokens, positions = [], [], []
    with using_curdkv_attention(model):
        for (ctx, *_), ids in zip(requests, questions):
            snapshot = ctx.cache.snapshot()
            try:
                start = torch.arange(ctx.context_length, ctx.context_length + ids.shape[1], device=device)[None]
                out = forward_with_cache(model, ctx.cache, input_ids=ids, position_ids=start, use_cache=True,
                                         logits_to_keep=1)
                prefilled.append(stack_contexts([ctx.cache]))  # this row's layers, question folded in
            finally:
                ctx.cache.restore(snapshot)
            first_tokens.append(out.logits[:, -1].argmax(-1))
            positions.append(ctx.context_length + ids.shape[1])
    return stack_contexts(prefilled), torch.cat(first_tokens), torch.tensor(positions, device=device)


@torch.no_grad()
def decode_rows(model, tokenizer, cache, token: torch.Tensor, position: torch.Tensor, max_new_tokens: int,
                cuda_graph: bool | None = None) -> list[str]:
    """:func:`ask_many`'s second half: every row of ``cache`` decoded greedily from its ``token`` at ``position``."""
    device = token.device
    stop = torch.tensor(_stop_list(model, tokenizer), device=device)
    stop_set = set(stop.tolist())
    with using_curdkv_attention(model):
        if _graph_decoding(cuda_graph, device, cache, max_new_tokens) and not bool(torch.isin(token, stop).all()):
            fixed = FixedCapacityCache.from_cache(cache, max_new_tokens)
            rest = GraphDecoder(model, fixed, token, position, stop, max_new_tokens - 1).run()
            tokens = torch.cat([token[:, None], rest], dim=1)
            return [_answer_text(tokenizer, row, stop_set) for row in tokens.tolist()]
        generated: list[list[int]] = [[] for _ in range(token.shape[0])]
        active = list(range(token.shape[0]))  # the original index of each batch row
        for step in range(max_new_tokens):
            finished = torch.isin(token, stop).tolist()
            for row, tok, done in zip(active, token.tolist(), finished):
                generated[row].append(tok)
            if step == max_new_tokens - 1:
                break
            keep = [i for i, done in enumerate(finished) if not done]
            if not keep:
                break
            if len(keep) < len(active):
                active = [active[i] for i in keep]
                cache = CompressedCache.from_layers([layer.select_rows(keep) for layer in cache.layers])
                token, position = token[keep], position[keep]
            out = forward_with_cache(model, cache, input_ids=token[:, None], position_ids=position[:, None],
                                     use_cache=True, logits_to_keep=1)
            token, position = out.logits[:, -1].argmax(-1), position + 1
    return [_answer_text(tokenizer, tokens, stop_set) for tokens in generated]


@torch.no_grad()
def prefill(
    model, tokenizer, context: str, press: Press | None = None, layout: str | None = None
) -> CompressedContext:
    """Prefill ``context`` alone and compress it layer by layer with ``press`` (``None``: keep everything).

    ``layout`` is where kept tokens live (see :func:`curdkv.runtime.layer.compress_layer`);
    the default suits the press (ragged for head-adaptive presses).

    >>> ctx = curdkv.prefill(model, tokenizer, long_text, curdkv.CurDKVPress(compression_ratio=0.5))
    >>> ctx.ask("What is the magic number?", max_new_tokens=16)
    """
    attention_modules(model)  # the same up-front model check as compress(), with or without a press
    refuse_inside_compress(model, "prefill()")
    if press is not None:
        check_press(press)
    device = next(model.parameters()).device
    ids = encode_context(tokenizer, context, device)
    cache = CompressedCache()
    if press is None:
        with using_curdkv_attention(model):
            forward_with_cache(model, cache, input_ids=ids, use_cache=True, logits_to_keep=1)
    else:
        with compress(model, press, layout, tokenizer=tokenizer):
            forward_with_cache(model, cache, input_ids=ids, use_cache=True, logits_to_keep=1)
    return CompressedContext(model, tokenizer, cache, ids.shape[1], press)


def capture_prefill(model, context, tokenizer=None, *, query_window: int = 64) -> PrefillCapture:
    """Run one full prefill and keep what presses read: the sweep path's one entry point.

    ``context``: text (encoded with ``tokenizer`` as :func:`prefill` does) or
    token ids ``[B, N]``. :meth:`PrefillCapture.build_cache` then builds the
    compressed cache of any press and ratio without running the model again.
    ``query_window``: the context queries kept (a press's ``query_window``,
    or :data:`curdkv.presses.base.ALL_QUERIES`).

    >>> capture = curdkv.capture_prefill(model, long_text, tokenizer)
    >>> caches = {r: capture.build_cache(curdkv.CurDKVPress(r)) for r in (0.5, 0.9)}
    """
    if isinstance(context, str):
        if tokenizer is None:
            raise ValueError("tokenizer is required when context is text (or pass token ids [batch, seq_len])")
        context = encode_context(tokenizer, context, next(model.parameters()).device)
    return capture_ids(model, context, query_window, tokenizer)


def prefill_capture(model, tokenizer, context: str, query_window: int = 64) -> PrefillCapture:
    """Deprecated: ``capture_prefill(model, context, tokenizer)``; the old name goes in the next release."""
    warnings.warn("curdkv.prefill_capture(model, tokenizer, text) is deprecated; use "
                  "curdkv.capture_prefill(model, text, tokenizer)", DeprecationWarning, stacklevel=2)
    return capture_prefill(model, context, tokenizer, query_window=query_window)
