"""H2O's chunked accumulated attention against the full N x N attention matrix."""

from __future__ import annotations

import math

import pytest
import torch

import curdkv
from curdkv.presses import ScoringView
from curdkv.presses import h2o as h2o_module
from curdkv.presses.adakv import AdaKVPress
from curdkv.presses.base import ALL_QUERIES
from curdkv.presses.h2o import H2OPress, accumulated_attention
from curdkv.cache.ragged import RaggedLayer
from curdkv.selection import kept_count, select_uniform

from conftest import random_ids, tiny_model
from curdkv.transformers_compat import forward_with_cache

B, H_KV = 2, 2


pytestmark = pytest.mark.usefixtures("one_thread")


def make_inputs(n: int, d: int, group: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(B, H_KV, n, d, generator=gen) * (0.5 + torch.rand(B, H_KV, n, 1, generator=gen))
    values = torch.randn(B, H_KV, n, d, generator=gen)
    # Sharper than unit scale so attention is far from uniform.
    queries = 2.0 * torch.randn(B, H_KV * group, n, d, generator=gen)
    return keys, values, queries


def view_of(keys, values, queries, module=None) -> ScoringView:
    return ScoringView(keys=keys, values=values, queries=queries, module=module, layer_idx=0)


def ref_h2o(keys, queries, scale=None) -> torch.Tensor:
    """Full causal softmax attention in float64, summed over queries, averaged over each group. [B, H_kv, N]."""
    b_, h_kv, n, d = keys.shape
    group = queries.shape[1] // h_kv
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    out = torch.zeros(b_, h_kv, n, dtype=torch.float64)
    for b in range(b_):
        for hq in range(queries.shape[1]):
            kv = hq // group
            logits = (queries[b, hq].double() @ keys[b, kv].double().T) * scale  # [N, N]
            attn = logits.masked_fill(~causal, float("-inf")).softmax(-1)
            out[b, kv] += attn.sum(0) / group
    return out


def close(got, ref, rtol=1e-5, atol=1e-5):
    torch.testing.assert_close(got.double(), ref.double(), rtol=rtol, atol=atol)


# --------------------------------------------------------------------------- scores


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 16, 49, 50, 64, 1000])
@pytest.mark.parametrize("group", [1, 2, 3])
def test_chunked_scores_equal_full_attention_column_sums(chunk_size, group):
    n, d = 50, 16
    keys, values, queries = make_inputs(n, d, group, seed=group)
    press = H2OPress(compression_ratio=0.5, window_size=8, chunk_size=chunk_size)
    got = press.score(view_of(keys, values, queries))
    assert got.dtype == torch.float32 and got.shape == (B, H_KV, n)
    close(got, ref_h2o(keys, queries))
    # Every query row sums to 1 and each group's mean keeps that: N in total per KV head.
    close(got.sum(-1), torch.full((B, H_KV), float(n)), rtol=1e-6, atol=1e-4)


def test_chunk_sizes_agree_with_each_other():
    n, d = 203, 16  # 203 = 7 * 29: chunk sizes below divide it or not
    keys, values, queries = make_inputs(n, d, 2, seed=11)
    ref = ref_h2o(keys, queries)
    for chunk_size in (1, 7, 10, 64, 128, 203, 512):
        got = H2OPress(chunk_size=chunk_size).score(view_of(keys, values, queries))
        close(got, ref)


def test_equal_keys_give_harmonic_tails():
    # All keys equal: query t attends uniformly to keys 0..t, so key j receives
    # sum_{t=j}^{N-1} 1/(t+1) (a tail of the harmonic series), whatever the queries.
    n = 40
    keys, values, queries = make_inputs(n, 8, 2, seed=3)
    keys = keys[:, :, :1].expand_as(keys).contiguous()
    got = H2OPress(chunk_size=6).score(view_of(keys, values, queries))
    expected = torch.tensor([sum(1.0 / (t + 1) for t in range(j, n)) for j in range(n)], dtype=torch.float64)
    close(got, expected.expand(B, H_KV, n), rtol=1e-6, atol=1e-6)
    assert bool(torch.isfinite(got).all())


@pytest.mark.parametrize("scale", [0.9, 0.05])
def test_logit_scaling_is_the_modules(scale):
    class Scaled(torch.nn.Module):
        scaling = scale

    n = 30
    keys, values, queries = make_inputs(n, 8, 2, seed=4)
    got = H2OPress(chunk_size=4).score(view_of(keys, values, queries, module=Scaled()))
    close(got, ref_h2o(keys, queries, scale=scale))


def test_chunks_never_hold_more_than_chunk_size_queries(monkeypatch):
    n, chunk_size = 70, 16
    keys, values, queries = make_inputs(n, 8, 2, seed=5)
    calls = []
    real = h2o_module.chunk_attention_sums

    def spy(q, k, start):
        calls.append((q.shape[3], k.shape[2], start))
        return real(q, k, start)

    monkeypatch.setattr(h2o_module, "chunk_attention_sums", spy)
    got = H2OPress(chunk_size=chunk_size).score(view_of(keys, values, queries))
    close(got, ref_h2o(keys, queries))
    # One call per chunk, each with at most chunk_size queries and only the keys they can see.
    assert calls == [(16, 16, 0), (16, 32, 16), (16, 48, 32), (16, 64, 48), (6, 70, 64)]


DEGENERATE = {
    "all_zero_keys": lambda k, q: (torch.zeros_like(k), q),
    "all_zero_queries": lambda k, q: (k, torch.zeros_like(q)),
    "huge_logits": lambda k, q: (k * 1e3, q * 1e3),
}


@pytest.mark.parametrize("case", list(DEGENERATE))
def test_degenerate_inputs_stay_finite(case):
    n = 40
    keys, values, queries = make_inputs(n, 8, 2, seed=6)
    keys, queries = DEGENERATE[case](keys, queries)
    got = H2OPress(chunk_size=9).score(view_of(keys, values, queries))
    assert bool(torch.isfinite(got).all()) and bool((got >= 0).all())
    close(got, ref_h2o(keys, queries), atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_score_in_float32(dtype):
    n = 40
    keys, values, queries = (t.to(dtype) for t in make_inputs(n, 8, 2, seed=7))
    got = H2OPress(chunk_size=7).score(view_of(keys, values, queries))
    assert got.dtype == torch.float32
    close(got, ref_h2o(keys, queries))


def test_more_queries_than_tokens_uses_the_last_ones_and_fewer_raise():
    n = 30
    keys, values, queries = make_inputs(n, 8, 2, seed=8)
    extra = torch.cat([torch.randn(B, 4, 5, 8), queries], dim=2)
    close(H2OPress(chunk_size=4).score(view_of(keys, values, extra)), ref_h2o(keys, queries))
    with pytest.raises(ValueError, match="queries of all 30 context tokens, the runtime captured 29"):
        H2OPress().score(view_of(keys, values, queries[:, :, 1:]))
    with pytest.raises(ValueError, match="the runtime captured 0"):
        H2OPress().score(view_of(keys, values, None))


def test_accumulated_attention_refuses_uneven_groups():
    keys, _, queries = make_inputs(10, 8, 2, seed=0)
    with pytest.raises(ValueError, match="3 query heads cannot share 2 KV heads"):
        accumulated_attention(queries[:, :3], keys, 0.3, 4)


# --------------------------------------------------------------------------- parameters


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"chunk_size": 0}, r"chunk_size must be an integer >= 1"),
        ({"chunk_size": -4}, r"chunk_size must be an integer >= 1"),
        ({"chunk_size": 2.5}, r"chunk_size must be an integer >= 1"),
        ({"chunk_size": None}, r"chunk_size must be an integer >= 1"),
        ({"chunk_size": True}, r"chunk_size must be an integer >= 1"),
        ({"window_size": -1}, r"window_size must be an integer >= 0"),
        ({"window_size": "8"}, r"window_size must be an integer >= 0"),
        ({"compression_ratio": -0.1}, r"compression_ratio must be a float in \[0, 1\)"),
    ],
)
def test_bad_parameters_name_themselves_and_the_allowed_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        H2OPress(**kwargs)


def test_defaults_and_contract():
    press = H2OPress()
    assert (press.compression_ratio, press.window_size, press.chunk_size) == (0.0, 64, 128)
    assert press.query_window == ALL_QUERIES and press.protected_recent == 64 and press.protected_sinks == 0
    assert press.name == "h2o" and press.scores_comparable_across_heads
    other = H2OPress(0.3, window_size=0, chunk_size=7).with_ratio(0.6)
    assert (other.compression_ratio, other.window_size, other.chunk_size) == (0.6, 0, 7)


# --------------------------------------------------------------------------- on a model


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-qwen3"])
@pytest.mark.parametrize("ratio,window,chunk_size", [(0.5, 16, 32), (0.75, 8, 7), (0.3, 0, 1000)])
def test_compress_keeps_recent_tokens_and_heavy_hitters(arch, ratio, window, chunk_size):
    model = tiny_model(arch)
    n = 120
    ids = random_ids(n, seed=1)
    press = H2OPress(compression_ratio=ratio, window_size=window, chunk_size=chunk_size)
    full = curdkv.capture_prefill(model, ids, query_window=n)
    cache = curdkv.CompressedCache()
    with curdkv.compress(model, press):
        forward_with_cache(model, cache, input_ids=ids, use_cache=True)
    n_keep = kept_count(n, ratio)
    for layer_idx, layer in enumerate(cache.layers):
        keys, values, queries = full.keys[layer_idx], full.values[layer_idx], full.queries[layer_idx]
        assert queries.shape[2] == n, "the runtime must hand H2O every context query"
        assert layer.keys.shape[2] == n_keep
        if window:
            torch.testing.assert_close(layer.keys[:, :, -window:], keys[:, :, -window:], rtol=0, atol=1e-6)
            torch.testing.assert_close(layer.values[:, :, -window:], values[:, :, -window:], rtol=0, atol=1e-6)
        # The rest are the heaviest hitters of the full attention matrix.
        scaling = model.model.layers[layer_idx].self_attn.scaling
        ref = ref_h2o(keys, queries, scale=scaling)
        idx = select_uniform(ref.float(), n_keep, 0, window)
        expected = keys.gather(2, idx[..., None].expand(-1, -1, -1, keys.shape[-1]))
        torch.testing.assert_close(layer.keys, expected, rtol=0, atol=1e-6)


def test_inside_adakv_keeps_recent_tokens_and_total_budget():
    model = tiny_model("tiny-llama")
    n, window, ratio = 120, 8, 0.6
    ids = random_ids(n, seed=2)
    press = AdaKVPress(H2OPress(compression_ratio=ratio, window_size=window, chunk_size=16))
    assert press.query_window == ALL_QUERIES
    full = curdkv.capture_prefill(model, ids, query_window=n)
    cache = curdkv.CompressedCache()
    with curdkv.compress(model, press):
        forward_with_cache(model, cache, input_ids=ids, use_cache=True)
    h_kv = model.config.num_key_value_heads
    for layer_idx, layer in enumerate(cache.layers):
        assert isinstance(layer, RaggedLayer)
        assert int(layer.lengths.sum()) == h_kv * kept_count(n, ratio)
        offsets = layer.offsets.tolist()
        for h in range(h_kv):
            head = layer.context_keys[offsets[h] : offsets[h + 1]]
            torch.testing.assert_close(head[-window:], full.keys[layer_idx][0, h, -window:], rtol=0, atol=1e-6)
