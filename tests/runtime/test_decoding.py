"""Compression while generating (``max_cache_tokens``) and presses that need the whole prefill first."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import curdkv
from curdkv.presses import KNormPress, SnapKVPress, StreamingLLMPress
from curdkv.presses.adakv import AdaSnapKVPress
from curdkv.presses.base import Press
from curdkv.transformers_compat import find_cache, forward_with_cache

N, NEW = 96, 40


def _generate(model, ids, press=None, **kwargs):
    if press is None:
        return model.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                              return_dict_in_generate=True)
    with curdkv.compress(model, press, **kwargs):
        return model.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                              return_dict_in_generate=True)


def _ids(seed=0):
    return torch.randint(3, 200, (1, N), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("press", [SnapKVPress(window_size=8), KNormPress(), StreamingLLMPress(num_sinks=4)],
                         ids=["snapkv", "knorm", "streamingllm"])
@pytest.mark.parametrize("cap", [32, 60])
def test_cache_stays_at_max_cache_tokens_through_generation(model, press, cap):
    out = _generate(model, _ids(), press, max_cache_tokens=cap)
    cache = find_cache(out)
    assert out.sequences.shape[1] == N + NEW
    for layer in cache.layers:
        assert layer.keys.shape[2] == cap and layer.values.shape[2] == cap
        # The cache's logical length is what was really processed, so positions stay right.
        assert layer.get_seq_length() == N + NEW - 1


def test_streaming_keeps_sinks_and_the_most_recent_tokens(model):
    press, cap = StreamingLLMPress(num_sinks=4), 32
    budget_holder = {}
    from curdkv.runtime import decoding

    original = decoding.DecodeBudget.__init__

    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        budget_holder["budget"] = self

    decoding.DecodeBudget.__init__ = spy
    try:
        out = _generate(model, _ids(), press, max_cache_tokens=cap)
    finally:
        decoding.DecodeBudget.__init__ = original
    logical = find_cache(out).layers[0].get_seq_length()
    expected = list(range(4)) + list(range(logical - (cap - 4), logical))
    for positions in budget_holder["budget"].positions.values():
        assert positions[0, 0].tolist() == expected


def test_large_budget_changes_nothing(model):
    ids = _ids(1)
    plain = _generate(model, ids)
    capped = _generate(model, ids, SnapKVPress(window_size=8), max_cache_tokens=N + NEW + 5)
    assert torch.equal(plain.sequences, capped.sequences)


def test_prefill_ratio_and_cap_both_apply(model):
    # 50% of 96 is 48 > 40: the cap wins from the prefill on.
    out = _generate(model, _ids(), SnapKVPress(compression_ratio=0.5, window_size=8), max_cache_tokens=40)
    assert all(layer.keys.shape[2] == 40 for layer in find_cache(out).layers)


@pytest.mark.parametrize("bad", [0, 8, 12, -1, 3.5, True, "64"])
def test_max_cache_tokens_must_exceed_protected_tokens(model, bad):
    with pytest.raises(ValueError, match="max_cache_tokens must be an integer > 12"):
        with curdkv.compress(model, SnapKVPress(window_size=12), max_cache_tokens=bad):
            pass


def test_max_cache_tokens_refuses_head_adaptive_and_ragged(model):
    with pytest.raises(ValueError, match="head-adaptive"):
        with curdkv.compress(model, AdaSnapKVPress(0.5, window_size=8), max_cache_tokens=64):
            pass
    with pytest.raises(ValueError, match="layout must be 'dense'"):
        with curdkv.compress(model, SnapKVPress(0.5, window_size=8), layout="ragged", max_cache_tokens=64):
            pass


def test_hooks_removed_after_error_in_decoding_block(model):
    before = (len(model._forward_hooks), sum(len(m._forward_hooks) for m in model.modules()))
    with pytest.raises(RuntimeError, match="boom"):
        with curdkv.compress(model, SnapKVPress(window_size=8), max_cache_tokens=64):
            raise RuntimeError("boom")
    after = (len(model._forward_hooks), sum(len(m._forward_hooks) for m in model.modules()))
    assert before == after


@dataclass
class _LayerBudgets(Press):
    """Keeps the highest-norm keys, with budgets that differ per layer and are set from all layers' scores."""

    needs_full_prefill = True

    def score(self, view):
        return view.keys.float().norm(dim=-1)

    def layer_keeps(self, scores, seq_len):
        base = super().layer_keeps(scores, seq_len)
        return [k - 4 * (i % 2) for i, k in enumerate(base)]


def test_full_prefill_press_same_cache_in_both_paths(model):
    ids = _ids(2)
    press = _LayerBudgets(compression_ratio=0.5)
    swept = curdkv.capture_prefill(model, ids).build_cache(press, "dense")
    cache = curdkv.CompressedCache()
    with curdkv.compress(model, press, layout="dense"):
        forward_with_cache(model, cache, input_ids=ids, use_cache=True)
    assert [layer.keys.shape[2] for layer in cache.layers] == [48 - 4 * (i % 2) for i in range(len(cache.layers))]
    for a, b in zip(cache.layers, swept.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
        assert a.get_seq_length() == N
