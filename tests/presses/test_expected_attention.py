"""ExpectedAttention against a float64 reference built from pre-RoPE queries and the model's own rotations."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import curdkv
from conftest import random_ids, tiny_model
from curdkv.cache.dense import CompressedCache
from curdkv.presses import AdaKVPress, ExpectedAttentionPress, ScoringView, get_press
from curdkv.transformers_compat import forward_with_cache
from helpers import attention_module, rotate


def mean_rotation(arch: str, positions, d: int) -> torch.Tensor:
    """The mean of the model's RoPE maps over ``positions``, from its rotary embedding applied to basis vectors."""
    model = tiny_model(arch)
    basis = torch.eye(d)[None, None]
    maps = []
    for p in positions:
        cos, sin = model.model.rotary_emb(basis, torch.full((1, d), int(p)))
        rotated, _ = apply_rotary_pos_emb(basis, basis, cos, sin)
        maps.append(rotated[0, 0].T.double())
    return torch.stack(maps).mean(0)


def reference(pre_queries, keys, values, arch, sinks, future, covariance=True, value_norm=True):
    """Float64, head by head: Gaussian queries moved by the mean rotation, softmax of the expected logits
    over the tokens after the sinks (the sinks scored as each head's best)."""
    b, h, n, d = pre_queries.shape
    h_kv = keys.shape[1]
    group = h // h_kv
    s = d ** -0.5
    rot = mean_rotation(arch, range(n, n + future), d)
    out = torch.zeros(b, h_kv, n, dtype=torch.float64)
    for i in range(b):
        for head in range(h):
            q = pre_queries[i, head, sinks:].double()
            mu = rot @ q.mean(0)
            cov = rot @ torch.cov(q.T, correction=0) @ rot.T
            k = keys[i, head // group, sinks:].double()
            logits = s * k @ mu + (s * s / 2 * (k @ cov * k).sum(-1) if covariance else 0)
            out[i, head // group, sinks:] += logits.softmax(0) / group
    if value_norm:
        out[..., sinks:] *= values[:, :, sinks:].double().norm(dim=-1)
    out[..., :sinks] = out[..., sinks:].max(-1, keepdim=True).values
    return out


@pytest.mark.parametrize("covariance,value_norm", [(True, True), (False, True), (True, False)])
def test_expected_attention_matches_the_reference(covariance, value_norm):
    arch = "tiny-llama"  # 4 query heads on 2 KV heads, head dim 16
    g = torch.Generator().manual_seed(0)
    pre_q = torch.randn(1, 4, 60, 16, generator=g)
    keys = rotate(torch.randn(1, 2, 60, 16, generator=g), arch)
    values = torch.randn(1, 2, 60, 16, generator=g)
    view = ScoringView(keys=keys, values=values, queries=rotate(pre_q, arch), module=attention_module(arch),
                       layer_idx=0)
    press = ExpectedAttentionPress(0.5, future_positions=32, num_sinks=3, use_covariance=covariance,
                                   use_value_norm=value_norm)
    scores = press.score(view)
    assert scores.dtype == torch.float32 and scores.shape == (1, 2, 60)
    expected = reference(pre_q, keys, values, arch, 3, 32, covariance, value_norm)
    torch.testing.assert_close(scores.double(), expected, rtol=1e-4, atol=1e-7)


def test_the_query_statistics_leave_the_sinks_out():
    """A huge sink query would dominate the mean; with num_sinks it has no effect at all."""
    arch = "tiny-llama"
    g = torch.Generator().manual_seed(1)
    pre_q = torch.randn(1, 4, 40, 16, generator=g)
    keys = rotate(torch.randn(1, 2, 40, 16, generator=g), arch)
    loud = pre_q.clone()
    loud[:, :, 0] *= 1000
    press = ExpectedAttentionPress(0.5, num_sinks=1)

    def scores(q):
        return press.score(ScoringView(keys=keys, values=keys, queries=rotate(q, arch),
                                       module=attention_module(arch), layer_idx=0))

    torch.testing.assert_close(scores(loud), scores(pre_q), rtol=1e-4, atol=1e-6)


def test_the_sinks_take_no_share_of_the_softmax():
    """A sink key that draws nearly all of one query head's attention changes no other token's score.

    With the sinks in the softmax, that head's probabilities shrank by its sink mass, so it counted
    for nothing in its GQA group's average and ranked below every other head under AdaKV.
    """
    arch = "tiny-llama"
    g = torch.Generator().manual_seed(2)
    pre_q = torch.randn(1, 4, 50, 16, generator=g)
    pre_q[:, 0] += 3 * torch.randn(16, generator=g)  # query head 0 has a strong mean direction
    pre_k = torch.randn(1, 2, 50, 16, generator=g)
    values = torch.randn(1, 2, 50, 16, generator=g)
    press = ExpectedAttentionPress(0.5, num_sinks=2)
    module = attention_module(arch)

    def scores(k):
        return press.score(ScoringView(keys=rotate(k, arch), values=values, queries=rotate(pre_q, arch),
                                       module=module, layer_idx=0))

    loud = pre_k.clone()
    loud[:, 0, 1] = 4 * pre_q[0, 0, 2:].mean(0)  # the sink at position 1 aligned with head 0's queries
    plain, sunk = scores(pre_k), scores(loud)
    torch.testing.assert_close(sunk[..., 2:], plain[..., 2:], rtol=1e-4, atol=1e-7)
    assert torch.equal(sunk[..., :2], sunk[..., 2:].amax(-1, keepdim=True).expand(-1, -1, 2))


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-qwen2", "tiny-qwen3"])
def test_expected_attention_compresses_a_prefill_qwen3_included(arch):
    model = tiny_model(arch)
    cache = CompressedCache()
    with curdkv.compress(model, get_press("expectedattention", 0.5)):
        forward_with_cache(model, cache, input_ids=random_ids(80, seed=2), use_cache=True)
    assert all(layer.keys.shape[2] == 40 for layer in cache.layers)
    ada = get_press("adaexpectedattention", 0.5)
    assert isinstance(ada, AdaKVPress) and ada.head_adaptive


@pytest.mark.parametrize("field,value,message", [
    ("future_positions", 0, "future_positions must be an integer >= 1"),
    ("num_sinks", -1, "num_sinks must be an integer >= 0"),
    ("use_covariance", "yes", "use_covariance must be True or False"),
])
def test_bad_options_are_named(field, value, message):
    with pytest.raises(ValueError, match=message):
        ExpectedAttentionPress(0.5, **{field: value})


def test_expected_attention_refuses_decode_time_rescoring():
    keys = torch.randn(1, 2, 10, 16)
    view = ScoringView(keys=keys, values=keys, queries=torch.randn(1, 4, 10, 16), module=attention_module("tiny-llama"),
                       layer_idx=0, positions=torch.arange(10).expand(1, 2, -1))
    with pytest.raises(ValueError, match="cannot re-score a cache during decoding"):
        ExpectedAttentionPress(0.5).score(view)
