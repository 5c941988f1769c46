"""Head-adaptive budgets: AdaKVPress and its selection against a slow, obvious reference."""

from __future__ import annotations

import pytest
import torch

from curdkv import AdaCurDKVPress, AdaKVPress, AdaSnapKVPress, CurDKVPress
from curdkv.presses import ChunkKVPress, KNormPress, StreamingLLMPress
from curdkv.runtime.layer import compress_layer
from curdkv.selection import select_adaptive, select_uniform
from helpers import slow_adaptive


@pytest.mark.parametrize("alpha", [0.0, 0.2, 0.5, 1.0])
@pytest.mark.parametrize("sinks,recent", [(0, 0), (4, 0), (2, 6)])
@pytest.mark.parametrize("seed", range(3))
def test_select_adaptive_equals_slow_reference(alpha, sinks, recent, seed):
    gen = torch.Generator().manual_seed(seed)
    b, h, n, n_keep = 2, 4, 40, 14
    # Heads on different scales, so the shared budget really moves between heads.
    scores = torch.rand(b, h, n, generator=gen) * torch.tensor([1.0, 5.0, 0.2, 2.0])[None, :, None]
    keep = select_adaptive(scores, n_keep, alpha, sinks, recent)
    assert torch.equal(keep, slow_adaptive(scores, n_keep, alpha, sinks, recent))


@pytest.mark.parametrize("alpha", [0.0, 0.1, 0.2, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("n_keep", [8, 20, 59])
def test_budgets_total_safeguard_and_protection(alpha, n_keep):
    gen = torch.Generator().manual_seed(1)
    b, h, n, sinks, recent = 3, 8, 60, 4, 4
    scores = torch.randn(b, h, n, generator=gen) * torch.logspace(-2, 2, h)[None, :, None]
    keep = select_adaptive(scores, n_keep, alpha, sinks, recent)
    per_head = keep.sum(-1)
    assert (per_head.sum(-1) == h * n_keep).all(), "each batch element keeps exactly H_kv * k"
    assert (per_head >= int(alpha * n_keep + 1e-9)).all()
    assert keep[..., :sinks].all() and keep[..., n - recent :].all()
    if alpha < 1.0 and n_keep > sinks + recent:
        assert per_head.min() < per_head.max(), "heads on different scales should get different budgets"


@pytest.mark.parametrize("seed", range(5))
def test_alpha_one_is_the_uniform_selection(seed):
    scores = torch.randn(2, 4, 50, generator=torch.Generator().manual_seed(seed))
    keep = select_adaptive(scores, 17, 1.0, 4, 3)
    idx = select_uniform(scores, 17, 4, 3)
    expected = torch.zeros_like(keep).scatter_(-1, idx, True)
    assert torch.equal(keep, expected)


def test_select_adaptive_with_infinite_scores_keeps_protected_and_budget():
    scores = torch.randn(1, 4, 30)
    scores[0, 1, 10:20] = float("inf")
    scores[0, 2, :] = float("-inf")
    keep = select_adaptive(scores, 10, 0.2, 4, 2)
    assert keep.sum() == 40
    assert keep[..., :4].all() and keep[..., -2:].all()


@pytest.mark.parametrize("alpha", [-0.1, 1.5, "0.2", True, float("nan")])
def test_bad_alpha_raises(alpha):
    with pytest.raises(ValueError, match="alpha"):
        select_adaptive(torch.rand(1, 2, 10), 5, alpha)
    with pytest.raises(ValueError, match="alpha"):
        AdaKVPress(CurDKVPress(compression_ratio=0.5), alpha=alpha)


@pytest.mark.parametrize("inner", [KNormPress(compression_ratio=0.5), StreamingLLMPress(compression_ratio=0.5)])
def test_adakv_refuses_scores_not_comparable_across_heads(inner):
    with pytest.raises(ValueError, match="comparable across heads"):
        AdaKVPress(inner)


def test_adakv_refuses_chunks_and_nesting_and_non_press():
    with pytest.raises(ValueError, match="ChunkKV"):
        AdaKVPress(ChunkKVPress(compression_ratio=0.5))
    with pytest.raises(ValueError, match="already adaptive"):
        AdaKVPress(AdaCurDKVPress(0.5))
    with pytest.raises(TypeError, match="press must be"):
        AdaKVPress("curdkv")


def test_adakv_mirrors_the_wrapped_press():
    press = AdaSnapKVPress(compression_ratio=0.3, alpha=0.5, window_size=16)
    assert press.name == "adasnapkv"
    assert press.compression_ratio == 0.3
    assert press.query_window == 16 and press.protected_recent == 16
    other = press.with_ratio(0.7)
    assert isinstance(other, AdaSnapKVPress) and other.compression_ratio == 0.7 and other.alpha == 0.5
    assert other.press.window_size == 16
    assert press.compression_ratio == 0.3, "with_ratio must not change the original"
    assert AdaCurDKVPress(0.5, estimator="exact").press.estimator == "exact"
    assert AdaCurDKVPress(0.5) == AdaCurDKVPress(0.5) and AdaCurDKVPress(0.5) != AdaCurDKVPress(0.5, alpha=0.3)
    assert "alpha=0.2" in AdaCurDKVPress(0.5).describe()
    with pytest.raises(ValueError, match="compression_ratio"):
        AdaCurDKVPress(1.0)


def test_dense_layout_refused_for_adaptive_press():
    keys = torch.randn(1, 2, 30, 8)
    with pytest.raises(ValueError, match="layout must be 'ragged' or 'masked'"):
        compress_layer(AdaCurDKVPress(0.5), keys, keys, None, None, 0, "dense")
    with pytest.raises(ValueError, match="layout must be one of"):
        compress_layer(AdaCurDKVPress(0.5), keys, keys, None, None, 0, "sparse")


def test_old_wrapper_names_still_work_with_a_deprecation_warning():
    import curdkv.presses

    for module in (curdkv, curdkv.presses, curdkv.presses.adakv):
        for old, new in (("AdaKV", "AdaKVPress"), ("AdaCurDKV", "AdaCurDKVPress"), ("AdaSnapKV", "AdaSnapKVPress")):
            with pytest.warns(DeprecationWarning, match=f"use {module.__name__}.{new}"):
                assert getattr(module, old) is getattr(curdkv, new)
    with pytest.raises(AttributeError, match="NoSuchPress"):
        curdkv.NoSuchPress
