"""Lookahead Q-Cache against slow obvious references."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import curdkv
from curdkv.presses import LookaheadQCachePress, SnapKVPress, get_press
from curdkv.presses.base import ScoringView
from curdkv.transformers_compat import forward_with_cache
from helpers import _view


def test_lookahead_attention_masks_window_causally_and_pseudo_not_at_all():
    base = _view(n=20, d=4, h_kv=1, group=1, w=3 + 2)
    view = ScoringView(base.keys, base.values, base.queries[:, :, :3], None, 0, pseudo_queries=base.queries[:, :, 3:])
    press = LookaheadQCachePress(window_size=3, lookahead_tokens=2, kernel_size=1)
    from curdkv.presses.lookahead_qcache import lookahead_attention

    attn = lookahead_attention(view, 3, 2)[0, 0]
    assert torch.all(attn[0, 18:] == 0) and torch.all(attn[1, 19:] == 0) and attn[2, 19] > 0
    assert torch.all(attn[3:] > 0)
    scores = press.score(view)
    assert torch.allclose(scores[0, 0, :17], attn[:, :17].sum(0))


def test_lookahead_pseudo_queries_are_the_queries_of_the_greedy_continuation(tiny_models):
    model = tiny_models("tiny-llama", torch.float32)
    ids = torch.randint(3, 200, (1, 120), generator=torch.Generator().manual_seed(4))
    press = LookaheadQCachePress(compression_ratio=0.5, lookahead_tokens=4)
    capture = curdkv.capture_prefill(model, ids, query_window=32)
    from curdkv.runtime.lookahead import pseudo_queries

    pseudo = pseudo_queries(capture, press)
    assert pseudo[0].shape[2] == 4
    # The continuation decoded from the temporary SnapKV cache:
    with curdkv.compress(model, press.lookahead_press()):
        out = model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    tokens = out[0, 120:124]
    # Layer 0's query depends only on the token and its position: recompute it directly.
    layer = model.model.layers[0]
    attn = layer.self_attn
    hidden = layer.input_layernorm(model.model.embed_tokens(tokens[None]))
    q = attn.q_proj(hidden).view(1, 4, -1, attn.head_dim).transpose(1, 2)
    positions = torch.arange(120, 124)[None]
    cos, sin = model.model.rotary_emb(hidden, positions)
    q, _ = apply_rotary_pos_emb(q, q, cos, sin)
    assert torch.allclose(pseudo[0], q, atol=1e-5)


def test_lookahead_same_cache_in_both_paths(tiny_models):
    model = tiny_models("tiny-qwen2", torch.float32)
    ids = torch.randint(3, 200, (1, 150), generator=torch.Generator().manual_seed(5))
    press = get_press("lookahead", 0.6)
    swept = curdkv.capture_prefill(model, ids, query_window=press.query_window).build_cache(press, "dense")
    live = curdkv.CompressedCache()
    with curdkv.compress(model, press, layout="dense"):
        forward_with_cache(model, live, input_ids=ids, use_cache=True)
    for a, b in zip(live.layers, swept.layers):
        assert torch.allclose(a.keys, b.keys) and a.get_seq_length() == 150


def test_lookahead_without_pseudo_queries_is_a_clear_error():
    # Enough window queries to be mistaken for window + pseudo: still refused.
    view = _view(n=50, w=16)
    with pytest.raises(ValueError, match="needs 4 pseudo queries, got 0"):
        LookaheadQCachePress(window_size=8, lookahead_tokens=4).score(view)


def test_sweep_reuses_scores_across_ratios_except_lookahead(tiny_models):
    model = tiny_models("tiny-llama", torch.float32)
    ids = torch.randint(3, 200, (1, 160), generator=torch.Generator().manual_seed(6))
    capture = curdkv.capture_prefill(model, ids, query_window=64)
    calls = []
    snap = SnapKVPress(compression_ratio=0.3)
    original = SnapKVPress.score
    SnapKVPress.score = lambda self, view: calls.append(1) or original(self, view)
    try:
        first = capture.build_cache(snap, "dense")
        second = capture.build_cache(snap.with_ratio(0.6), "dense")
    finally:
        SnapKVPress.score = original
    layers = model.config.num_hidden_layers
    assert len(calls) == layers  # scored once for both ratios
    fresh = curdkv.capture_prefill(model, ids, query_window=64).build_cache(snap.with_ratio(0.6), "dense")
    for a, b in zip(second.layers, fresh.layers):
        assert torch.equal(a.keys, b.keys)
    assert first.layers[0].stored_length > second.layers[0].stored_length
    # Lookahead's pseudo queries come from a cache compressed at its ratio: scored again.
    la = LookaheadQCachePress(compression_ratio=0.3)
    s1 = capture.scores(la, capture.window_queries(la))
    s2 = capture.scores(la.with_ratio(0.8), capture.window_queries(la))
    assert not all(torch.equal(a, b) for a, b in zip(s1, s2))
