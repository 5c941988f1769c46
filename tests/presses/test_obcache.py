"""OBCache against slow references written out query by query and token by token."""

from __future__ import annotations

import math

import pytest
import torch

import curdkv
from curdkv.presses import ScoringView
from curdkv.presses.adakv import AdaKVPress
from curdkv.presses.obcache import OBCachePress
from curdkv.cache.ragged import RaggedLayer
from curdkv.selection import kept_count, select_uniform

from conftest import random_ids, tiny_model
from curdkv.transformers_compat import forward_with_cache

B, H_KV = 2, 2
SALIENCIES = ("value", "key", "joint")


pytestmark = pytest.mark.usefixtures("one_thread")


def make_inputs(n: int, d: int, group: int, window: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(B, H_KV, n, d, generator=gen) * (0.5 + torch.rand(B, H_KV, n, 1, generator=gen))
    values = torch.randn(B, H_KV, n, d, generator=gen) * (0.5 + torch.rand(B, H_KV, n, 1, generator=gen))
    # Sharper than unit scale so attention is far from uniform and logits far from 0.
    queries = 2.0 * torch.randn(B, H_KV * group, window, d, generator=gen)
    return keys, values, queries


class Scaled(torch.nn.Module):
    """Stands in for an attention module whose logit scaling is not 1/sqrt(D)."""

    def __init__(self, scaling: float):
        super().__init__()
        self.scaling = scaling


def view_of(keys, values, queries, module=None) -> ScoringView:
    return ScoringView(keys=keys, values=values, queries=queries, module=module, layer_idx=0)


# --------------------------------------------------------------------------- reference


def ref_token_terms(q, k, v, pos, scale):
    """For one window query at ``pos``: per visible token j, (value, key, cross) terms of the paper, float64."""
    s = [float(k[j] @ q) * scale for j in range(pos + 1)]
    top = max(s)
    e = [math.exp(x - top) for x in s]
    z = sum(e)
    a = [x / z for x in e]
    o = sum(a[j] * v[j] for j in range(pos + 1))
    terms = []
    for j in range(pos + 1):
        value = a[j] ** 2 * float(v[j] @ v[j])
        key = (a[j] * s[j]) ** 2 * float((v[j] - o) @ (v[j] - o))
        cross = 2.0 * a[j] ** 2 * s[j] * float(v[j] @ (v[j] - o))
        terms.append((value, key, cross))
    return terms


def ref_pool(x: torch.Tensor, pooling, kernel_size: int) -> torch.Tensor:
    if pooling is None:
        return x
    pad, n = kernel_size // 2, len(x)
    windows = [x[max(0, j - pad) : min(n, j + pad + 1)] for j in range(n)]
    return torch.stack([w.max() if pooling == "max" else w.mean() for w in windows])


def ref_obcache(keys, values, queries, window, saliency, pooling=None, kernel_size=7, scale=None):
    """Scores of the tokens before the window, ``[B, H_kv, N - W]``: loops over heads, window queries, tokens."""
    b_, h_kv, n, d = keys.shape
    group = queries.shape[1] // h_kv
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    length = n - window
    out = torch.zeros(b_, h_kv, length, dtype=torch.float64)
    for b in range(b_):
        for hq in range(queries.shape[1]):
            kv = hq // group
            k, v = keys[b, kv].double(), values[b, kv].double()
            per_head = torch.zeros(length, dtype=torch.float64)
            for i in range(window):
                pos = n - window + i
                terms = ref_token_terms(queries[b, hq, -window + i].double(), k, v, pos, scale)
                for j in range(length):
                    value, key, cross = terms[j]
                    per_head[j] += {"value": value, "key": key, "joint": value + key + cross}[saliency]
            out[b, kv] += ref_pool(per_head, pooling, kernel_size)
    return out


def close(got, ref, rtol=1e-4, atol=1e-6):
    torch.testing.assert_close(got.double(), ref.double(), rtol=rtol, atol=atol)


# --------------------------------------------------------------------------- scores


@pytest.mark.parametrize("saliency", SALIENCIES)
@pytest.mark.parametrize("group,n,d,window", [(1, 30, 8, 5), (2, 41, 16, 8), (3, 25, 8, 1)])
def test_scores_match_the_papers_sums(saliency, group, n, d, window):
    keys, values, queries = make_inputs(n, d, group, window, seed=n * group)
    press = OBCachePress(compression_ratio=0.5, window_size=window, saliency=saliency)
    assert press.query_window == window and press.protected_recent == window
    got = press.score(view_of(keys, values, queries))
    assert got.dtype == torch.float32 and got.shape == (B, H_KV, n)
    ref = ref_obcache(keys, values, queries, window, saliency)
    close(got[..., : n - window], ref)
    assert bool((got >= 0).all())
    # Window tokens are protected; their score is the head's top so the tensor is all finite.
    assert torch.equal(got[..., n - window :], got[..., : n - window].amax(-1, keepdim=True).expand(-1, -1, window))


@pytest.mark.parametrize("saliency", SALIENCIES)
@pytest.mark.parametrize("pooling,kernel_size", [("max", 7), ("avg", 5), ("max", 1), ("avg", 3)])
def test_pooling_per_query_head_then_group_sum(saliency, pooling, kernel_size):
    n, d, group, window = 36, 8, 2, 6
    keys, values, queries = make_inputs(n, d, group, window, seed=3)
    press = OBCachePress(window_size=window, saliency=saliency, pooling=pooling, kernel_size=kernel_size)
    got = press.score(view_of(keys, values, queries))
    close(got[..., : n - window], ref_obcache(keys, values, queries, window, saliency, pooling, kernel_size))
    if kernel_size > 1:
        plain = OBCachePress(window_size=window, saliency=saliency).score(view_of(keys, values, queries))
        assert not torch.allclose(got, plain)


@pytest.mark.parametrize("saliency", ["key", "joint"])
def test_logit_scaling_is_the_modules(saliency):
    # The key and joint scores carry s_ij itself, so the module's scaling (not 1/sqrt(D)) must enter.
    n, d, window = 30, 8, 5
    keys, values, queries = make_inputs(n, d, 2, window, seed=4)
    press = OBCachePress(window_size=window, saliency=saliency)
    got = press.score(view_of(keys, values, queries, module=Scaled(0.9)))
    close(got[..., : n - window], ref_obcache(keys, values, queries, window, saliency, scale=0.9))
    default = press.score(view_of(keys, values, queries))
    assert not torch.allclose(got, default, rtol=1e-2)


def test_zero_logits_make_key_score_zero_and_joint_the_value_score():
    # q = 0: every logit s_ij is 0, so pruning a key changes nothing (to first order).
    n, d, window = 30, 8, 5
    keys, values, queries = make_inputs(n, d, 2, window, seed=5)
    v = view_of(keys, values, torch.zeros_like(queries))
    key = OBCachePress(window_size=window, saliency="key").score(v)
    assert torch.count_nonzero(key) == 0
    joint = OBCachePress(window_size=window, saliency="joint").score(v)
    value = OBCachePress(window_size=window, saliency="value").score(v)
    close(joint, value, rtol=1e-6, atol=0)
    # Uniform attention: window query i (position n-w+i) gives 1/(n-w+i+1) to each visible token,
    # summed over the group's 2 heads.
    a_sq = sum(1.0 / (n - window + i + 1) ** 2 for i in range(window))
    close(value[..., : n - window], 2 * a_sq * values[..., : n - window, :].double().square().sum(-1))


def test_zero_value_token_has_zero_value_score():
    n, d, window = 30, 8, 5
    keys, values, queries = make_inputs(n, d, 1, window, seed=6)
    values[:, :, 7] = 0.0
    got = OBCachePress(window_size=window).score(view_of(keys, values, queries))
    assert torch.count_nonzero(got[:, :, 7]) == 0
    assert bool((got[:, :, :7] > 0).all())


DEGENERATE = {
    "all_equal_keys": lambda k, v, q: (k[:, :, :1].expand_as(k).contiguous(), v, q),
    "all_zero_keys": lambda k, v, q: (torch.zeros_like(k), v, q),
    "all_zero_values": lambda k, v, q: (k, torch.zeros_like(v), q),
    "all_equal_values": lambda k, v, q: (k, v[:, :, :1].expand_as(v).contiguous(), q),
    "huge_logits": lambda k, v, q: (k * 100.0, v, q * 100.0),
}


@pytest.mark.parametrize("saliency", SALIENCIES)
@pytest.mark.parametrize("case", list(DEGENERATE))
def test_degenerate_inputs_give_finite_non_negative_scores(saliency, case):
    n, window = 40, 8
    keys, values, queries = DEGENERATE[case](*make_inputs(n, 16, 2, window, seed=7))
    press = OBCachePress(compression_ratio=0.5, window_size=window, saliency=saliency)
    got = press.score(view_of(keys, values, queries))
    assert bool(torch.isfinite(got).all()) and bool((got >= 0).all())
    if case == "all_equal_values":  # o_i = v_j for every j: key pruning changes nothing
        if saliency == "key":
            assert float(got.abs().max()) < 1e-9
    idx = select_uniform(got, kept_count(n, 0.5), 0, window)
    assert bool((idx[..., -window:] == torch.arange(n - window, n)).all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("saliency", SALIENCIES)
def test_half_precision_inputs_score_in_float32(dtype, saliency):
    n, window = 40, 8
    keys, values, queries = (t.to(dtype) for t in make_inputs(n, 16, 2, window, seed=8))
    got = OBCachePress(window_size=window, saliency=saliency).score(view_of(keys, values, queries))
    assert got.dtype == torch.float32
    ref = OBCachePress(window_size=window, saliency=saliency).score(
        view_of(keys.float(), values.float(), queries.float())
    )
    close(got, ref, rtol=1e-5, atol=1e-6)


def test_uses_the_last_window_queries_when_given_more():
    n, d, window = 30, 8, 4
    keys, values, queries = make_inputs(n, d, 2, 9, seed=9)
    got = OBCachePress(window_size=window, saliency="joint").score(view_of(keys, values, queries))
    close(got[..., : n - window], ref_obcache(keys, values, queries[:, :, -window:], window, "joint"))


def test_short_context_and_missing_queries_raise():
    keys, values, queries = make_inputs(10, 8, 1, 10, seed=0)
    with pytest.raises(ValueError, match="longer than window_size=10"):
        OBCachePress(window_size=10).score(view_of(keys, values, queries))
    with pytest.raises(ValueError, match="last 4 context queries"):
        OBCachePress(window_size=4).score(view_of(keys, values, None))
    with pytest.raises(ValueError, match="last 6 context queries, the runtime captured 5"):
        OBCachePress(window_size=6).score(view_of(keys, values, queries[:, :, :5]))


# --------------------------------------------------------------------------- parameters


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"window_size": 0}, r"window_size must be an integer >= 1"),
        ({"window_size": -3}, r"window_size must be an integer >= 1"),
        ({"window_size": 4.0}, r"window_size must be an integer >= 1"),
        ({"window_size": True}, r"window_size must be an integer >= 1"),
        ({"saliency": "values"}, r"saliency must be one of \['joint', 'key', 'value'\]"),
        ({"saliency": None}, r"saliency must be one of \['joint', 'key', 'value'\]"),
        ({"pooling": "mean"}, r"pooling must be one of \[None, 'max', 'avg'\]"),
        ({"pooling": "none"}, r"pooling must be one of \[None, 'max', 'avg'\]"),
        ({"kernel_size": 0}, r"kernel_size must be an integer >= 1"),
        ({"kernel_size": 4}, r"kernel_size must be odd"),
        ({"compression_ratio": 1.0}, r"compression_ratio must be a float in \[0, 1\)"),
    ],
)
def test_bad_parameters_name_themselves_and_the_allowed_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OBCachePress(**kwargs)


def test_defaults_and_with_ratio():
    press = OBCachePress()
    assert (press.compression_ratio, press.window_size, press.saliency, press.pooling, press.kernel_size) == (
        0.0, 16, "value", None, 7
    )
    assert press.scores_comparable_across_heads
    other = OBCachePress(0.3, window_size=8, saliency="joint", pooling="max").with_ratio(0.6)
    assert (other.compression_ratio, other.window_size, other.saliency, other.pooling) == (0.6, 8, "joint", "max")
    assert press.name == "obcache"


# --------------------------------------------------------------------------- on a model


@pytest.mark.parametrize("saliency", SALIENCIES)
@pytest.mark.parametrize("ratio", [0.5, 0.8])
def test_compress_keeps_window_and_budget_on_a_model(saliency, ratio):
    model = tiny_model("tiny-llama")
    n, window = 120, 16
    ids = random_ids(n, seed=1)
    press = OBCachePress(compression_ratio=ratio, window_size=window, saliency=saliency)
    full = curdkv.capture_prefill(model, ids, query_window=window)
    cache = curdkv.CompressedCache()
    with curdkv.compress(model, press):
        forward_with_cache(model, cache, input_ids=ids, use_cache=True)
    n_keep = kept_count(n, ratio)
    for layer_idx, layer in enumerate(cache.layers):
        keys = full.keys[layer_idx]
        assert layer.keys.shape[2] == n_keep
        values, queries = full.values[layer_idx], full.queries[layer_idx]
        torch.testing.assert_close(layer.keys[:, :, -window:], keys[:, :, -window:], rtol=0, atol=1e-6)
        torch.testing.assert_close(layer.values[:, :, -window:], values[:, :, -window:], rtol=0, atol=1e-6)
        # The kept tokens are the top-scored ones of the same press on the captured prefill.
        scores = press.score(view_of(keys, values, queries, model.model.layers[layer_idx].self_attn))
        idx = select_uniform(scores, n_keep, 0, window)
        expected = keys.gather(2, idx[..., None].expand(-1, -1, -1, keys.shape[-1]))
        torch.testing.assert_close(layer.keys, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("saliency", SALIENCIES)
def test_inside_adakv_keeps_window_and_total_budget(saliency):
    model = tiny_model("tiny-llama")
    n, window, ratio = 120, 16, 0.6
    ids = random_ids(n, seed=2)
    press = AdaKVPress(OBCachePress(compression_ratio=ratio, window_size=window, saliency=saliency), alpha=0.2)
    assert press.name == "adaobcache" and press.protected_recent == window and press.query_window == window
    full = curdkv.capture_prefill(model, ids, query_window=window)
    cache = curdkv.CompressedCache()
    with curdkv.compress(model, press):
        forward_with_cache(model, cache, input_ids=ids, use_cache=True)
    n_keep = kept_count(n, ratio)
    h_kv = model.config.num_key_value_heads
    for layer_idx, layer in enumerate(cache.layers):
        assert isinstance(layer, RaggedLayer)
        assert int(layer.lengths.sum()) == h_kv * n_keep
        assert bool((layer.lengths >= window).all())
        offsets = layer.offsets.tolist()
        for h in range(h_kv):
            head = layer.context_keys[offsets[h] : offsets[h + 1]]
            torch.testing.assert_close(head[-window:], full.keys[layer_idx][0, h, -window:], rtol=0, atol=1e-6)
    with curdkv.compress(model, press):
        out = model.generate(ids, max_new_tokens=3, do_sample=False, min_new_tokens=3)
    assert out.shape[1] == n + 3
