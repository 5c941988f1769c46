"""The model's RoPE undone and averaged (curdkv.presses.rope) against transformers' own rotary embeddings."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from conftest import random_ids, tiny_model
from curdkv.models import random_config
from curdkv.presses.rope import average_rotation, unrotate
from curdkv.transformers_compat import forward_with_cache
from helpers import attention_module, rotate


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-qwen2"])
def test_unrotate_inverts_the_models_own_rope(arch):
    pre = torch.randn(2, 2, 70, 16, generator=torch.Generator().manual_seed(1))
    post = rotate(pre, arch)
    assert (post - pre).abs().max() > 0.5  # the rotation is not trivial
    back = unrotate(post, attention_module(arch))
    assert back.dtype == torch.float32
    torch.testing.assert_close(back, pre, rtol=0, atol=2e-5)


@pytest.mark.parametrize(
    "rope",
    [
        dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=1024),
        dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
             original_max_position_embeddings=64),
        dict(rope_type="linear", rope_theta=10000.0, factor=2.0),
        dict(rope_type="dynamic", rope_theta=10000.0, factor=2.0),
    ],
)
def test_unrotate_inverts_scaled_rope_types(rope):
    config = random_config("tiny-llama", rope_parameters=rope)
    rotary = LlamaRotaryEmbedding(config)
    pre = torch.randn(1, 2, 300, 16, generator=torch.Generator().manual_seed(2))
    cos, sin = rotary(pre, torch.arange(300)[None])
    _, post = apply_rotary_pos_emb(pre, pre, cos, sin)
    if rope["rope_type"] == "yarn":
        assert rotary.attention_scaling != 1.0  # the factor the inverse must divide out
    back = unrotate(post, SimpleNamespace(config=config))
    torch.testing.assert_close(back, pre, rtol=0, atol=5e-5)


def test_unrotate_at_given_positions():
    arch = "tiny-llama"
    pre = torch.randn(1, 2, 40, 16, generator=torch.Generator().manual_seed(3))
    post = rotate(pre, arch)
    module = attention_module(arch)
    torch.testing.assert_close(unrotate(post[:, :, 10:], module, start=10), pre[:, :, 10:], rtol=0, atol=2e-5)
    positions = torch.arange(40).expand(1, 2, -1)[:, :, ::3]
    torch.testing.assert_close(unrotate(post[:, :, ::3], module, positions=positions), pre[:, :, ::3],
                               rtol=0, atol=2e-5)


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-qwen2", "tiny-qwen3"])
def test_unrotated_cache_equals_the_projected_keys_of_a_prefill(arch):
    """End to end: the cached keys un-rotated are k_proj of the layer input (after k_norm for Qwen3)."""
    model = tiny_model(arch)
    attn = model.model.layers[1].self_attn
    seen = {}

    def keep_input(mod, args, kwargs):
        seen["hidden"] = kwargs.get("hidden_states", args[0] if args else None)

    handle = attn.register_forward_pre_hook(keep_input, with_kwargs=True)
    try:
        cache = DynamicCache()
        forward_with_cache(model, cache, input_ids=random_ids(90, seed=4), use_cache=True)
    finally:
        handle.remove()
    hidden = seen["hidden"]
    expected = attn.k_proj(hidden).view(1, 90, -1, attn.head_dim).transpose(1, 2)
    if hasattr(attn, "k_norm"):
        expected = attn.k_norm(expected)
    torch.testing.assert_close(unrotate(cache.layers[1].keys, attn), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "module, message",
    [
        (None, "attention module"),
        (SimpleNamespace(), "has no .config"),
        (SimpleNamespace(config=SimpleNamespace(rope_parameters=None)), "rope_parameters"),
        (SimpleNamespace(config=SimpleNamespace(rope_parameters={"rope_type": "default"})), "rope_theta"),
        (SimpleNamespace(config=SimpleNamespace(rope_parameters={"rope_type": "mystery", "rope_theta": 1e4})),
         "rope_type must be one of"),
    ],
)
def test_unrotate_names_what_is_missing(module, message):
    with pytest.raises(ValueError, match=message):
        unrotate(torch.zeros(1, 1, 4, 16), module)


def test_average_rotation_is_the_mean_of_the_models_rotations():
    """Built from the model's own apply_rotary_pos_emb on basis vectors, position by position."""
    model = tiny_model("tiny-llama")
    d = 16
    basis = torch.eye(d)[None, None]  # [1, 1, D, D]: row i is e_i
    positions = torch.arange(100, 140)
    maps = []
    for p in positions:
        cos, sin = model.model.rotary_emb(basis, torch.full((1, d), int(p)))
        rotated, _ = apply_rotary_pos_emb(basis, basis, cos, sin)
        maps.append(rotated[0, 0].T)  # column i is the image of e_i
    expected = torch.stack(maps).mean(0)
    torch.testing.assert_close(average_rotation(attention_module("tiny-llama"), positions, d), expected,
                               rtol=0, atol=1e-5)
