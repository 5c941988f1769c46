"""PyramidKV against slow obvious references."""

from __future__ import annotations

import pytest
import torch

import curdkv
from curdkv.presses import PyramidKVPress, SnapKVPress
from curdkv.presses.pyramidkv import pyramid_budgets


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
