"""Compression reaches the cache in every supported transformers release, and says so loudly when it cannot."""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import tomllib
from pathlib import Path

import pytest
import torch
import transformers
from packaging.version import Version
from transformers import Cache

import curdkv
from curdkv.cache.dense import CompressedCache
from curdkv.transformers_compat import (
    TESTED_TRANSFORMERS,
    cache_keyword,
    find_cache,
    forward_with_cache,
)

from conftest import random_ids

ROOT = Path(__file__).resolve().parents[1]
N, RATIO = 120, 0.5
KEPT = N - int(N * RATIO)


class CacheHandle:
    """What a future release might pass around instead of the Cache itself: a proxy, not a ``Cache``."""

    def __init__(self, cache):
        self._cache = cache

    def __getattr__(self, name):
        return getattr(self._cache, name)


def _hand_on_a_handle(module, args, kwargs):
    """A forward pre-hook that replaces the cache argument by a :class:`CacheHandle`."""
    return args, {k: CacheHandle(v) if isinstance(v, Cache) else v for k, v in kwargs.items()}


@contextlib.contextmanager
def future_rename(model):
    """The model, and so its layers and outputs, carry the cache only as a handle."""
    handle = model.register_forward_pre_hook(_hand_on_a_handle, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def test_the_tested_range_is_what_pyproject_allows_and_compat_runs():
    """pyproject allows the tested releases up to the newest tested minor; tools/compat.py runs both ends."""
    low, high = (Version(v) for v in TESTED_TRANSFORMERS)
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    pins = [d.split("#")[0].strip() for d in pyproject["project"]["dependencies"] if d.startswith("transformers")]
    assert pins == [f"transformers>={low},<{high.major}.{high.minor + 1}"]
    spec = importlib.util.spec_from_file_location("compat_tool", ROOT / "tools" / "compat.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.RELEASES[0] == str(low) and tool.RELEASES[-1] == str(high)
    pinned = [line for line in (ROOT / "constraints.txt").read_text().splitlines() if line.startswith("transformers==")]
    assert pinned == [f"transformers=={high}"]
    assert low <= Version(transformers.__version__) < Version(f"{high.major}.{high.minor + 1}")


def test_cache_keyword_matches_the_installed_release(model):
    keyword = cache_keyword(model)
    assert keyword in inspect.signature(type(model).forward).parameters
    assert keyword == ("cache" if Version(transformers.__version__) >= Version("5.24") else "past_key_values")


def test_find_cache_by_type_whatever_the_keyword():
    cache = CompressedCache()
    assert find_cache({"cache": cache}) is cache
    assert find_cache({"past_key_values": cache}) is cache
    assert find_cache({"anything": cache}) is cache
    assert find_cache((torch.zeros(1), cache)) is cache
    assert find_cache({"x": 1}, ()) is None


def test_generate_under_compress_compresses_through_the_releases_own_cache(model):
    """``generate`` builds its own cache and passes it under the release's keyword (``cache=`` from 5.24)."""
    ids = random_ids(N)
    with curdkv.compress(model, curdkv.CurDKVPress(compression_ratio=RATIO)):
        out = model.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    cache = find_cache(out)
    assert cache is not None
    assert all(layer.keys.shape[2] == KEPT + 2 for layer in cache.layers)  # 2 of 3 new tokens were cached
    assert cache.get_seq_length() == N + 2


@pytest.mark.parametrize("press_name", ["curdkv", "adacurdkv", "lava", "lookahead"])
def test_a_future_rename_raises_instead_of_keeping_the_full_cache(model, press_name):
    """Layer-by-layer, head-adaptive, whole-prefill and lookahead presses all refuse to pass silently."""
    press = curdkv.get_press(press_name, RATIO)
    cache = CompressedCache()
    with future_rename(model):
        full = CompressedCache()
        forward_with_cache(model, full, input_ids=random_ids(N), use_cache=True)  # the model runs with a handle
        assert full.get_seq_length() == N
        with pytest.raises(RuntimeError) as error:
            with curdkv.compress(model, press):
                forward_with_cache(model, cache, input_ids=random_ids(N), use_cache=True)
    message = str(error.value)
    assert "layer 0" in message and repr(press.name) in message
    assert f"transformers {transformers.__version__}" in message
    assert not model._forward_hooks and not model._forward_pre_hooks
    # The same model and press compress once the cache is reachable again.
    cache = CompressedCache()
    with curdkv.compress(model, press):
        forward_with_cache(model, cache, input_ids=random_ids(N), use_cache=True)
    assert cache.get_seq_length() == N
    assert cache.nbytes() < full.nbytes()


def test_a_decode_budget_that_cannot_reach_the_cache_raises(model):
    with future_rename(model), pytest.raises(RuntimeError, match=r"layer 0 .*'snapkv'"):
        with curdkv.compress(model, curdkv.SnapKVPress(compression_ratio=0.0, window_size=8), max_cache_tokens=40):
            model.generate(random_ids(N), max_new_tokens=2, do_sample=False)


def test_attention_that_bypasses_curdkv_raises(model):
    """A release that ignored the attention switch would attend, and cache, past curdkv: that is an error."""

    def back_to_sdpa(module, args, kwargs):
        module.config._attn_implementation = "sdpa"

    handle = model.register_forward_pre_hook(back_to_sdpa, with_kwargs=True)
    try:
        with pytest.raises(RuntimeError, match="did not run through curdkv's attention function"):
            with curdkv.compress(model, curdkv.CurDKVPress(compression_ratio=RATIO)):
                forward_with_cache(model, CompressedCache(), input_ids=random_ids(N), use_cache=True)
    finally:
        handle.remove()
    assert model.config._attn_implementation != "curdkv"


def test_nested_compress_is_refused(model):
    press = curdkv.CurDKVPress(compression_ratio=RATIO)
    with curdkv.compress(model, press):
        with pytest.raises(RuntimeError, match="inside curdkv.compress"):
            with curdkv.compress(model, press):
                pass
        with pytest.raises(RuntimeError, match="inside curdkv.compress"):
            curdkv.capture_prefill(model, random_ids(N))
        # The outer block still works, and compresses once: the logical length stays the context's.
        cache = CompressedCache()
        forward_with_cache(model, cache, input_ids=random_ids(N), use_cache=True)
    assert cache.get_seq_length() == N
    assert all(layer.keys.shape[2] == KEPT for layer in cache.layers)
    with curdkv.compress(model, press):  # usable again after the block
        pass


def test_prefill_inside_compress_is_refused(model):
    with curdkv.compress(model, curdkv.CurDKVPress(compression_ratio=RATIO)):
        for press in (None, curdkv.CurDKVPress(compression_ratio=RATIO)):
            with pytest.raises(RuntimeError, match=r"prefill\(\) inside curdkv.compress"):
                curdkv.prefill(model, None, "some context", press)


@pytest.mark.parametrize("press", [None, curdkv.CurDKVPress(compression_ratio=RATIO)], ids=["no press", "curdkv"])
def test_prefill_checks_the_model_with_or_without_a_press(press):
    """A sliding-window model would attend to the whole context under curdkv's attention: refused up front."""
    config = curdkv.models.random_config("tiny-mistral", sliding_window=64)
    mistral = transformers.AutoModelForCausalLM.from_config(config).eval()
    with pytest.raises(ValueError, match="sliding-window"):
        curdkv.prefill(mistral, None, "some context", press)
    gpt2 = transformers.AutoModelForCausalLM.from_config(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2))
    with pytest.raises(ValueError, match="unsupported architecture"):
        curdkv.prefill(gpt2, None, "some context", press)
