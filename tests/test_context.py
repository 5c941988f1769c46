"""curdkv.context: many (context, question) pairs answered in one decode batch, each as if asked alone."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

import curdkv
from curdkv.cache.ragged import RaggedLayer
from curdkv.context import ask_many
from conftest import tiny_model


class ByteTokenizer:
    """A tokenizer for the tiny models: one token per character (its code mod 256), no chat template."""

    chat_template = None

    def __init__(self, eos_token_id=None):
        self.eos_token_id = eos_token_id

    def __call__(self, text, add_special_tokens=True, return_tensors="pt"):
        return SimpleNamespace(input_ids=torch.tensor([[ord(c) % 256 for c in text]]))

    def decode(self, ids, skip_special_tokens=True):
        return ",".join(str(i) for i in ids)


def _text(n: int, seed: int) -> str:
    rng = random.Random(seed)
    return "".join(chr(rng.randrange(33, 127)) for _ in range(n))


PRESSES = [None, curdkv.CurDKVPress(0.5, num_sinks=2), curdkv.AdaCurDKVPress(0.6, num_sinks=2),
           curdkv.KNormPress(0.5), curdkv.StreamingLLMPress(0.7, num_sinks=2)]


def _requests(model, tokenizer):
    contexts = [curdkv.prefill(model, tokenizer, _text(n, seed), press)
                for n, seed, press in zip((40, 90, 65, 120, 52), range(5), PRESSES)]
    return [(ctx, _text(4 + 3 * i, 10 + i)) for i, ctx in enumerate(contexts)]


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-qwen2"])
def test_ask_many_answers_every_context_as_it_would_be_answered_alone(arch, monkeypatch):
    model = tiny_model(arch)
    # An end token that row 0 emits early, so rows leave the batch at different steps.
    probe = _requests(model, ByteTokenizer())
    eos = int(probe[0][0].ask(probe[0][1], 6).split(",")[2])
    tokenizer = ByteTokenizer(eos)
    requests = _requests(model, tokenizer)
    alone = [ctx.ask(question, 12) for ctx, question in requests]
    held = [ctx.nbytes() for ctx, _ in requests]
    dropped = []
    original = RaggedLayer.select_rows
    monkeypatch.setattr(RaggedLayer, "select_rows", lambda self, rows: dropped.append(len(rows)) or original(self, rows))
    assert ask_many(requests, 12) == alone
    assert dropped, "a row that finished early must leave the batch"
    assert [ctx.nbytes() for ctx, _ in requests] == held  # every context's cache is left as it was
    assert [ctx.ask(question, 12) for ctx, question in requests] == alone


def test_ask_many_takes_each_requests_own_answer_prefix():
    model, tokenizer = tiny_model("tiny-llama"), ByteTokenizer()
    (a, qa), (b, qb) = _requests(model, tokenizer)[:2]
    assert ask_many([(a, qa, "xy"), (b, qb, "zzz")], 5) == [a.ask(qa, 5, "xy"), b.ask(qb, 5, "zzz")]


def test_ask_many_refuses_what_it_cannot_answer():
    model, tokenizer = tiny_model("tiny-llama"), ByteTokenizer()
    (ctx, question), *_ = _requests(model, tokenizer)
    with pytest.raises(ValueError, match="at least one"):
        ask_many([])
    with pytest.raises(TypeError, match="CompressedContext"):
        ask_many([("some text", question)])
    with pytest.raises(ValueError, match="max_new_tokens"):
        ask_many([(ctx, question)], 0)
    other = curdkv.prefill(tiny_model("tiny-qwen2"), tokenizer, _text(30, 1))
    with pytest.raises(ValueError, match="same model"):
        ask_many([(ctx, question), (other, question)])
    masked = curdkv.prefill(model, tokenizer, _text(40, 2), curdkv.AdaCurDKVPress(0.5, num_sinks=2), layout="masked")
    with pytest.raises(ValueError, match="MaskedLayer"):
        ask_many([(masked, question)])
