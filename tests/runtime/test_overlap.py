"""Compression overlapped with the prefill, and the layer path that never waits for the GPU."""

from __future__ import annotations

import math

import pytest
import torch

import curdkv
from curdkv.runtime.overlap import LayerProblems
from curdkv.cache.ragged import offsets_from_lengths
from curdkv.cache.ragged import RaggedLayer
from curdkv.runtime.layer import compress_layer
from curdkv.selection import in_context_order
from conftest import random_ids, tiny_model
from curdkv.transformers_compat import forward_with_cache

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA; run on the GPU machine")


def _mask(b, h, n, k, seed=0):
    """A keep mask with exactly ``h * k`` entries per batch element, unevenly spread over heads."""
    gen = torch.Generator().manual_seed(seed)
    keep = torch.zeros(b, h, n, dtype=torch.bool)
    for i in range(b):
        keep[i].view(-1)[torch.randperm(h * n, generator=gen)[: h * k]] = True
    keep[..., 0] = True  # no empty head
    for i in range(b):  # back to exactly h * k
        extra = int(keep[i].sum()) - h * k
        drop = keep[i].view(-1).nonzero()[:, 0]
        drop = drop[drop % n != 0][:extra]
        keep[i].view(-1)[drop] = False
    return keep


@pytest.mark.parametrize("b", [1, 2])
def test_packing_with_known_total_equals_boolean_indexing(b):
    h, n, d, k = 3, 40, 8, 11
    keys, values = torch.randn(b, h, n, d), torch.randn(b, h, n, 2 * d)
    keep = _mask(b, h, n, k)
    reference = RaggedLayer.from_mask(keys, values, keep)
    fast = RaggedLayer.from_mask(keys, values, keep, total=b * h * k)
    assert torch.equal(fast.context_keys, reference.context_keys)
    assert torch.equal(fast.context_values, reference.context_values)
    assert torch.equal(fast.lengths, reference.lengths)
    assert fast.lengths.device.type == "cpu"
    assert torch.equal(fast.offsets, reference.offsets)
    assert not bool(fast.empty_heads().any())


@pytest.mark.parametrize("b,h,n,k", [(1, 1, 1, 1), (1, 3, 50, 7), (2, 4, 300, 299), (3, 2, 64, 32)])
def test_in_context_order_equals_sorting(b, h, n, k):
    scores = torch.randn(b, h, n, generator=torch.Generator().manual_seed(n))
    indices = scores.topk(k, dim=-1, sorted=False).indices
    assert torch.equal(in_context_order(indices, n), indices.sort(dim=-1).values)


def test_uniform_ragged_offsets_are_built_on_the_device_side_equal():
    keys = torch.randn(2, 3, 7, 8)
    layer = RaggedLayer.from_dense(keys, keys, 20)
    assert torch.equal(layer.offsets, offsets_from_lengths(layer.lengths))
    assert layer.lengths.tolist() == [[7] * 3] * 2


def test_layer_problems_messages():
    press = curdkv.KNormPress(compression_ratio=0.5)
    problems = LayerProblems(press, 4, 100, torch.zeros(2, 1, 3, dtype=torch.long))
    assert problems.message(problems.counts) is None
    nan = torch.tensor([[[0, 2, 1]], [[0, 0, 0]]])
    assert problems.message(nan).startswith(f"{press!r} returned 3 NaN scores at layer 4, KV heads [1, 2], over 100 tokens")
    empty = torch.tensor([[[0, 0, 0]], [[0, 1, 0]]])
    assert "at layer 4 some kept none" in problems.message(empty)


def test_layer_problems_of_a_uniform_layer_count_nan_only_and_are_read_with_the_others():
    from curdkv.runtime.overlap import first_problem, layer_problems

    press = curdkv.KNormPress(compression_ratio=0.5)
    scores = torch.zeros(1, 3, 10)
    uniform = layer_problems(press, 0, scores, None)
    assert uniform.counts.shape == (1, 1, 3) and uniform.message(uniform.counts) is None
    adaptive = layer_problems(press, 1, scores, torch.tensor([[False, True, False]]))
    assert adaptive.counts.shape == (2, 1, 3)
    scores[0, 2, 4] = float("nan")
    broken = layer_problems(press, 2, scores, None)
    found = first_problem([uniform, adaptive, broken])
    # Layer 1's empty head comes first; without it, layer 2's NaN.
    assert found[0] is adaptive and "some kept none" in found[1]
    found = first_problem([uniform, broken])
    assert found[0] is broken and "returned 1 NaN scores at layer 2, KV heads [2]" in found[1]


def test_adaptive_layer_with_an_empty_head_is_refused():
    # alpha=0, no sinks: the shared budget can all go to one head.
    press = curdkv.AdaCurDKVPress(compression_ratio=0.5, alpha=0.0, num_sinks=0)
    keys = torch.randn(1, 2, 20, 8)
    scores = torch.zeros(1, 2, 20)
    scores[0, 0] = 1.0
    with pytest.raises(ValueError, match="every KV head must keep at least one token; at layer 2"):
        compress_layer(press, keys, keys, None, None, 2, scores=scores)


@pytest.mark.parametrize("bad", ["yes", 1, None])
def test_overlap_must_be_a_bool(bad):
    model = tiny_model("tiny-llama")
    with pytest.raises(ValueError, match="overlap must be True or False"):
        with curdkv.compress(model, curdkv.CurDKVPress(compression_ratio=0.5), overlap=bad):
            pass


# ------------------------------------------------------------------ CUDA


def _layers_equal(a, b):
    for x, y in zip(a.layers, b.layers):
        for name in ("context_keys", "context_values", "keys", "values", "offsets"):
            if hasattr(x, name):
                assert torch.equal(getattr(x, name), getattr(y, name)), name
        if hasattr(x, "lengths"):
            assert torch.equal(x.lengths, y.lengths)


@needs_cuda
@pytest.mark.parametrize("name", ["curdkv", "adacurdkv", "snapkv"])
def test_overlapped_prefill_keeps_the_same_tokens_and_generates_the_same(name):
    from transformers import DynamicCache

    model = tiny_model("tiny-llama", torch.bfloat16).cuda()
    ids = random_ids(600).cuda()
    caches, texts = [], []
    for overlap in (True, False):
        press = curdkv.get_press(name, 0.6)
        with curdkv.compress(model, press, overlap=overlap):
            cache = DynamicCache()
            forward_with_cache(model, cache, input_ids=ids, use_cache=True)
            caches.append(cache)
            out = model.generate(ids, max_new_tokens=12, do_sample=False)
            texts.append(out[0, ids.shape[1]:].tolist())
    _layers_equal(*caches)
    assert texts[0] == texts[1]
    assert caches[0].get_seq_length() == 600
    model.cpu()


@needs_cuda
@pytest.mark.parametrize("name", ["curdkv", "adacurdkv", "snapkv", "knorm"])
def test_layer_path_never_waits_for_the_gpu(name):
    # What lets compression run beside the prefill: no value read back mid-layer.
    b, h_kv, h, n, d = 1, 4, 8, 4096, 64
    keys = torch.randn(b, h_kv, n, d, device="cuda", dtype=torch.bfloat16)
    values = torch.randn(b, h_kv, n, d, device="cuda", dtype=torch.bfloat16)
    queries = torch.randn(b, h, 64, d, device="cuda", dtype=torch.bfloat16)
    module = type("M", (), {"scaling": d**-0.5, "layer_idx": 0, "config": None})()
    press = curdkv.get_press(name, 0.5)
    compress_layer(press, keys, values, queries, module, 0, problems=[])  # compile kernels first
    problems = []
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        layer = compress_layer(press, keys, values, queries, module, 0, problems=problems)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(problems) == 1 and problems[0].message(problems[0].counts.cpu()) is None
    assert layer.get_seq_length() == n


@needs_cuda
def test_nan_found_on_the_side_stream_is_raised_when_the_prefill_ends():
    from transformers import DynamicCache

    class NaNHead(curdkv.KNormPress):
        def score(self, view):
            scores = super().score(view)
            if view.layer_idx == 1:
                scores[0, 0, 7] = math.nan
            return scores

    model = tiny_model("tiny-llama", torch.bfloat16).cuda()
    with pytest.raises(ValueError, match=r"NaNHead.*1 NaN scores at layer 1, KV heads \[0\].*when the prefill ended"):
        with curdkv.compress(model, NaNHead(compression_ratio=0.5)):
            forward_with_cache(model, DynamicCache(), input_ids=random_ids(200).cuda(), use_cache=True)
    assert len(model._forward_hooks) == 0
    assert all(len(layer.self_attn._forward_hooks) == 0 for layer in model.model.layers)
    model.cpu()


@needs_cuda
def test_build_cache_reads_checks_back_once_and_names_the_nan_layer():
    class NaNHead(curdkv.KNormPress):
        def score(self, view):
            scores = super().score(view)
            if view.layer_idx == 1 and self.compression_ratio > 0.6:
                scores[0, 0, 7] = math.nan
            return scores

    model = tiny_model("tiny-llama", torch.bfloat16).cuda()
    capture = curdkv.capture_prefill(model, random_ids(300).cuda())
    capture.build_cache(NaNHead(compression_ratio=0.5))  # compile kernels first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        import warnings

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cache = capture.build_cache(NaNHead(compression_ratio=0.5))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    # One read back of every layer's checks, not one per layer.
    assert len([w for w in caught if "synchroniz" in str(w.message)]) == 1
    assert cache.get_seq_length() == 300
    capture.forget_scores()  # KNorm's scores do not depend on the ratio: the capture would reuse them
    with pytest.raises(ValueError, match=r"1 NaN scores at layer 1, KV heads \[0\], over 300 tokens \(keys finite"):
        capture.build_cache(NaNHead(compression_ratio=0.7))
    model.cpu()
