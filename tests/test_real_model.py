"""Needle retrieval with the bundled SmolLM2-135M-Instruct, with the full cache and with CurDKV at 50%."""

from __future__ import annotations

import pytest
import torch

import curdkv
from curdkv.context import CompressedContext
from curdkv.eval.needle import answered, needle_samples
from helpers import stored_lengths

pytestmark = pytest.mark.real_model

# Seed 4: the full cache and CurDKV (exact leverage, the default) at 50% both answer it. The
# paper's Gaussian-sketch estimator lost the needle on all of seeds 0-7 (see test_sketch_estimator_needle).
SEED = 4
CONTEXT_TOKENS = 2048
MAX_NEW_TOKENS = 16


def curdkv_press() -> curdkv.CurDKVPress:
    return curdkv.CurDKVPress(compression_ratio=0.5)


@pytest.fixture(scope="module")
def sample(smollm2):
    _, tokenizer = smollm2
    return needle_samples(tokenizer, 1, context_tokens=CONTEXT_TOKENS, seed=SEED)[0]


@pytest.fixture(scope="module")
def full_ctx(smollm2, sample):
    model, tokenizer = smollm2
    return curdkv.prefill(model, tokenizer, sample.context)


@pytest.fixture(scope="module")
def compressed_ctx(smollm2, sample):
    model, tokenizer = smollm2
    return curdkv.prefill(model, tokenizer, sample.context, curdkv_press())


def ask(ctx, sample) -> str:
    return ctx.ask(sample.question, max_new_tokens=MAX_NEW_TOKENS, answer_prefix=sample.answer_prefix)


def test_prompt_is_about_2k_tokens(full_ctx, sample):
    assert 1800 <= full_ctx.context_length <= 2200
    assert sample.answer in sample.context
    assert sample.answer not in sample.question + sample.answer_prefix


def test_full_cache_answers_needle(full_ctx, sample):
    prediction = ask(full_ctx, sample)
    assert answered(sample, prediction), f"full cache answered {prediction!r}, expected {sample.answer}"


def test_curdkv_half_cache_answers_needle(compressed_ctx, sample):
    assert compressed_ctx.cache.layers[0].evicted > 0
    prediction = ask(compressed_ctx, sample)
    assert answered(sample, prediction), f"CurDKV at 50% answered {prediction!r}, expected {sample.answer}"


def test_asking_twice_same_answer_and_cache_unchanged(compressed_ctx, sample):
    lengths = stored_lengths(compressed_ctx.cache)
    seq_len = compressed_ctx.cache.get_seq_length()
    nbytes = compressed_ctx.nbytes()
    first = ask(compressed_ctx, sample)
    assert stored_lengths(compressed_ctx.cache) == lengths
    second = ask(compressed_ctx, sample)
    assert second == first
    assert stored_lengths(compressed_ctx.cache) == lengths
    assert compressed_ctx.cache.get_seq_length() == seq_len == compressed_ctx.context_length
    assert compressed_ctx.nbytes() == nbytes


def test_half_compression_halves_bytes(full_ctx, compressed_ctx):
    n = full_ctx.context_length
    assert compressed_ctx.context_length == n
    kept = n - int(n * 0.5)
    assert stored_lengths(full_ctx.cache) == [n] * len(full_ctx.cache.layers)
    assert stored_lengths(compressed_ctx.cache) == [kept] * len(compressed_ctx.cache.layers)
    assert compressed_ctx.nbytes() * n == full_ctx.nbytes() * kept
    assert compressed_ctx.nbytes() / full_ctx.nbytes() == pytest.approx(0.5, abs=0.01)


def test_sweep_path_gives_same_answer(smollm2, sample, compressed_ctx):
    model, tokenizer = smollm2
    capture = curdkv.capture_prefill(model, sample.context, tokenizer)
    swept = CompressedContext.from_capture(model, tokenizer, capture, curdkv_press())
    assert swept.context_length == compressed_ctx.context_length
    for a, b in zip(swept.cache.layers, compressed_ctx.cache.layers):
        assert torch.equal(a.keys, b.keys)
        assert torch.equal(a.values, b.values)
    assert answered(sample, ask(swept, sample))


@pytest.mark.xfail(
    strict=True,
    reason="the paper's estimator (Algorithm 1's Gaussian sketch, projection_dim=20) at 50% loses digits of the "
    "needle on SmolLM2-135M for every seed tried (0-7); exact leverage (the default) answers all of them",
)
def test_sketch_estimator_needle(smollm2, sample):
    model, tokenizer = smollm2
    press = curdkv.CurDKVPress(compression_ratio=0.5, estimator="projection")
    ctx = curdkv.prefill(model, tokenizer, sample.context, press)
    prediction = ask(ctx, sample)
    assert answered(sample, prediction), f"sketched CurDKV at 50% answered {prediction!r}, expected {sample.answer}"


def test_adacurdkv_half_cache_answers_needle_on_the_ragged_cache(smollm2, sample, full_ctx):
    model, tokenizer = smollm2
    capture = curdkv.capture_prefill(model, sample.context, tokenizer)
    press = curdkv.AdaCurDKVPress(compression_ratio=0.5)
    ragged = CompressedContext.from_capture(model, tokenizer, capture, press)
    masked = CompressedContext.from_capture(model, tokenizer, capture, press, layout="masked")
    assert all(isinstance(layer, curdkv.RaggedLayer) for layer in ragged.cache.layers)
    lengths = torch.stack([layer.lengths for layer in ragged.cache.layers])
    assert lengths.min() < lengths.max(), "heads should get different budgets"
    prediction = ask(ragged, sample)
    assert answered(sample, prediction), f"AdaCurDKVPress at 50% answered {prediction!r}, expected {sample.answer}"
    # Equal through the needle. In bfloat16 the ragged reference attention and sdpa over the masked
    # layout round differently, and later tokens can flip at near-ties: under transformers 5.17 the
    # two answers parted after the needle (":\n\n- 6088505\n- 6" against ":\n\n- 6088505\n\nThese are").
    through_needle = prediction.index(sample.answer) + len(sample.answer)
    assert ask(masked, sample)[:through_needle] == prediction[:through_needle]
    assert ask(ragged, sample) == prediction, "asking must leave the ragged cache as it was"
    # the ragged cache really holds half; the masked reference (kvpress's layout) holds everything
    assert ragged.nbytes() / full_ctx.nbytes() == pytest.approx(0.5, abs=0.01)
    assert masked.nbytes() >= full_ctx.nbytes()
