"""MorphKV against slow obvious references."""

from __future__ import annotations

import math

import pytest
import torch

import curdkv
from curdkv.presses import MorphKVPress
from curdkv.transformers_compat import find_cache
from helpers import _softmax_row, _view


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
