"""PyramidKV, LAVa, MorphKV and Lookahead Q-Cache against slow obvious references."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import curdkv
from curdkv.presses import LAVaPress, LookaheadQCachePress, MorphKVPress, PyramidKVPress, SnapKVPress, get_press
from curdkv.presses.base import ScoringView
from curdkv.presses.lava import normalised_entropy
from curdkv.presses.pyramidkv import pyramid_budgets
from curdkv.transformers_compat import find_cache, forward_with_cache


def _view(n=40, d=8, h_kv=2, group=2, w=6, seed=0, b=1):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(b, h_kv, n, d, generator=g)
    values = torch.randn(b, h_kv, n, d, generator=g)
    queries = torch.randn(b, h_kv * group, w, d, generator=g)
    return ScoringView(keys=keys, values=values, queries=queries, module=None, layer_idx=0)


def _softmax_row(logits):
    m = max(logits)
    e = [math.exp(x - m) for x in logits]
    return [x / sum(e) for x in e]


# ---------------------------------------------------------------- PyramidKV


@pytest.mark.parametrize("n,ratio,window,layers,beta", [(4096, 0.5, 64, 24, 20), (4096, 0.9, 64, 24, 20),
                                                        (1000, 0.3, 8, 7, 5), (300, 0.1, 16, 30, 20)])
def test_pyramid_budgets_fall_linearly_and_average_the_uniform_budget(n, ratio, window, layers, beta):
    n_keep = curdkv.selection.kept_count(n, ratio)
    budgets = pyramid_budgets(n, n_keep, window, layers, beta)
    assert len(budgets) == layers
    assert all(a >= b for a, b in zip(budgets, budgets[1:]))
    assert all(window <= k <= n for k in budgets)
    assert abs(sum(budgets) / layers - n_keep) <= 1.0
    if 2 * (n_keep - window) - (n_keep - window) / beta <= n - window:
        # Uncapped: the last layer keeps b/beta tokens outside the window, the first 2b - b/beta.
        b = n_keep - window
        assert budgets[-1] == window + round(b / beta)
        assert budgets[0] == window + round(2 * b - b / beta)


def test_pyramidkv_keeps_layer_budgets_in_the_cache(tiny_models):
    model = tiny_models("tiny-llama", torch.float32)
    ids = torch.randint(3, 200, (1, 300), generator=torch.Generator().manual_seed(0))
    press = PyramidKVPress(compression_ratio=0.6, window_size=16)
    cache = curdkv.capture_prefill(model, ids, query_window=16).build_cache(press, "dense")
    expected = pyramid_budgets(300, 120, 16, model.config.num_hidden_layers, 20)
    assert [layer.stored_length for layer in cache.layers] == expected
    assert expected[0] > expected[-1]
    # Within a layer it keeps SnapKV's top tokens.
    snap = SnapKVPress(compression_ratio=0.6, window_size=16)
    capture = curdkv.capture_prefill(model, ids, query_window=16)
    last = len(cache.layers) - 1
    chosen = curdkv.runtime.layer.select_tokens(press, capture.keys[last], capture.values[last], capture.queries[last],
                                          capture.modules[last], last)
    snap_chosen = curdkv.runtime.layer.select_tokens(snap, capture.keys[last], capture.values[last], capture.queries[last],
                                               capture.modules[last], last, n_keep=expected[last])
    assert torch.equal(chosen, snap_chosen)


def test_pyramidkv_rejects_bad_beta():
    with pytest.raises(ValueError, match="beta must be an integer >= 1"):
        PyramidKVPress(beta=0)


# ---------------------------------------------------------------- MorphKV


@pytest.mark.parametrize("fusion", ["sum", "max"])
def test_morphkv_scores_match_loop_reference(fusion):
    view = _view(n=30, d=4, h_kv=2, group=3, w=5)
    press = MorphKVPress(window_size=5, fusion=fusion)
    scores = press.score(view)
    n, w, scale = 30, 5, 1 / math.sqrt(4)
    for kv in range(2):
        for j in range(n - w):
            per_row = []
            for r in range(w):
                best = 0.0
                for g in range(3):
                    q = view.queries[0, kv * 3 + g, r]
                    row = _softmax_row([float(q @ view.keys[0, kv, i]) * scale for i in range(n - w)])
                    best = max(best, row[j])
                per_row.append(best)
            expected = sum(per_row) if fusion == "sum" else max(per_row)
            assert scores[0, kv, j].item() == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_morphkv_holds_constant_cache_through_generation(tiny_models):
    model = tiny_models("tiny-qwen2", torch.float32)
    ids = torch.randint(3, 200, (1, 80), generator=torch.Generator().manual_seed(1))
    with curdkv.compress(model, MorphKVPress(window_size=8), max_cache_tokens=48):
        out = model.generate(ids, max_new_tokens=60, min_new_tokens=60, do_sample=False, return_dict_in_generate=True)
    assert out.sequences.shape[1] == 140
    assert all(layer.keys.shape[2] == 48 for layer in find_cache(out).layers)


def test_morphkv_rejects_bad_parameters():
    with pytest.raises(ValueError, match="fusion must be one of"):
        MorphKVPress(fusion="mean")
    with pytest.raises(ValueError, match="window_size must be an integer >= 1"):
        MorphKVPress(window_size=0)


# ---------------------------------------------------------------- LAVa


def test_lava_scores_match_loop_reference():
    n, d, h_kv, group, w, k = 24, 4, 2, 2, 4, 3
    view = _view(n=n, d=d, h_kv=h_kv, group=group, w=w, seed=3)
    scores = LAVaPress(window_size=w, kernel_size=k).score(view)
    scale = 1 / math.sqrt(d)
    for kv in range(h_kv):
        v_bound = max(float(view.values[0, kv, t].abs().sum()) for t in range(n - w))
        per_head = []
        for g in range(group):
            h = kv * group + g
            mean_attn = [0.0] * (n - w)
            for r in range(w):
                pos = n - w + r
                logits = [float(view.queries[0, h, r] @ view.keys[0, kv, i]) * scale for i in range(pos + 1)]
                row = _softmax_row(logits)
                for i in range(n - w):
                    mean_attn[i] += row[i] / w
            pooled = [max(mean_attn[max(0, i - k // 2): i + k // 2 + 1]) for i in range(n - w)]
            per_head.append(pooled)
        for i in range(n - w):
            expected = max(p[i] for p in per_head) * v_bound
            assert scores[0, kv, i].item() == pytest.approx(expected, rel=1e-5)


def test_lava_layer_budgets_follow_entropy():
    press = LAVaPress(compression_ratio=0.5, window_size=4)
    flat = torch.ones(1, 2, 100)
    peaked = torch.full((1, 2, 100), 1e-6)
    peaked[..., 0] = 1.0
    keeps = press.layer_keeps([flat, peaked], 100)
    assert normalised_entropy(flat[..., :96]) == pytest.approx(1.0)
    assert keeps[0] > keeps[1] >= 4
    e = [normalised_entropy(flat[..., :96]), normalised_entropy(peaked[..., :96])]
    assert keeps == [4 + int(x / sum(e) * 2 * 46) for x in e]


def test_lava_is_ragged_and_saves_the_uniform_memory(tiny_models):
    model = tiny_models("tiny-llama", torch.float32)
    ids = torch.randint(3, 200, (1, 256), generator=torch.Generator().manual_seed(2))
    capture = curdkv.capture_prefill(model, ids, query_window=32)
    cache = capture.build_cache(LAVaPress(compression_ratio=0.5))
    uniform = capture.build_cache(SnapKVPress(compression_ratio=0.5, window_size=32), "dense")
    assert all(isinstance(layer, curdkv.cache.ragged.RaggedLayer) for layer in cache.layers if layer.stored_length < 256)
    # Entropy shares round down, so LAVa holds at most the uniform budget, and within a few tokens of it.
    assert uniform.nbytes() * 0.95 <= cache.nbytes() <= uniform.nbytes()
    # The layer-by-layer path (which defers to the end of the prefill) keeps the same tokens.
    live = curdkv.CompressedCache()
    with curdkv.compress(model, LAVaPress(compression_ratio=0.5)):
        forward_with_cache(model, live, input_ids=ids, use_cache=True)
    for a, b in zip(live.layers, cache.layers):
        assert torch.equal(a.kept_lengths(), b.kept_lengths()) if hasattr(a, "kept_lengths") else a.stored_length == b.stored_length


# ---------------------------------------------------------------- Lookahead Q-Cache


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
