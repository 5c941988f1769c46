"""LAVa against slow obvious references."""

from __future__ import annotations

import math

import pytest
import torch

import curdkv
from curdkv.presses import LAVaPress, SnapKVPress
from curdkv.presses.lava import normalised_entropy
from curdkv.transformers_compat import forward_with_cache
from helpers import _softmax_row, _view


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
