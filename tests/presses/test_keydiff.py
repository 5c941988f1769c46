"""KeyDiff against a float64 loop over heads and tokens, and on keys built to have one outlier."""

from __future__ import annotations

import pytest
import torch

import curdkv
from curdkv.presses import KeyDiffPress, ScoringView, get_press


def reference(keys: torch.Tensor) -> torch.Tensor:
    b, h, n, _ = keys.shape
    out = torch.empty(b, h, n, dtype=torch.float64)
    for i in range(b):
        for j in range(h):
            k = keys[i, j].double()
            anchor = (k / k.norm(dim=-1, keepdim=True)).mean(0)
            for t in range(n):
                out[i, j, t] = -(k[t] @ anchor) / (k[t].norm() * anchor.norm())
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_keydiff_scores_match_the_reference(dtype):
    keys = torch.randn(2, 3, 40, 16, generator=torch.Generator().manual_seed(0)).to(dtype)
    view = ScoringView(keys=keys, values=keys, queries=None, module=None, layer_idx=0)
    scores = KeyDiffPress(0.5).score(view)
    assert scores.dtype == torch.float32 and scores.shape == (2, 3, 40)
    torch.testing.assert_close(scores.double(), reference(keys), rtol=0, atol=1e-5)


def test_keydiff_keeps_the_distinctive_key():
    g = torch.Generator().manual_seed(1)
    direction = torch.randn(16, generator=g)
    keys = (direction + 0.05 * torch.randn(1, 1, 30, 16, generator=g))
    keys[0, 0, 17] = -direction  # the one key pointing elsewhere
    view = ScoringView(keys=keys, values=keys, queries=None, module=None, layer_idx=0)
    assert int(KeyDiffPress(0.9).score(view)[0, 0].argmax()) == 17


def test_keydiff_through_the_registry_and_a_prefill(model):
    press = get_press("keydiff", 0.5)
    assert isinstance(press, KeyDiffPress) and press.name == "keydiff"
    assert press.scores_comparable_across_heads
    from conftest import random_ids
    from curdkv.cache.dense import CompressedCache
    from curdkv.transformers_compat import forward_with_cache

    cache = CompressedCache()
    with curdkv.compress(model, press):
        forward_with_cache(model, cache, input_ids=random_ids(64), use_cache=True)
    assert all(layer.keys.shape[2] == 32 for layer in cache.layers)
