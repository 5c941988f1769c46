"""Bad input fails early, with an error that names what is wrong."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

import curdkv
from curdkv.presses import (
    PRESSES,
    ChunkKVPress,
    CurDKVPress,
    KNormPress,
    LAVaPress,
    Press,
    RandomPress,
    ScoringView,
    SnapKVPress,
    StreamingLLMPress,
    parse_press_spec,
)
from helpers import CACHED_STATES, compress_states
from curdkv.selection import kept_count, select_uniform

PRESS_CLASSES = [CurDKVPress, SnapKVPress, ChunkKVPress, KNormPress, StreamingLLMPress, RandomPress]

BAD_RATIOS = [-0.1, -1e-12, 1.0, 1.5, math.nan, math.inf, -math.inf, "0.5", None, True, [0.5]]


def _ids(values):
    return [repr(v) for v in values]


@pytest.mark.parametrize("ratio", BAD_RATIOS, ids=_ids(BAD_RATIOS))
@pytest.mark.parametrize("cls", PRESS_CLASSES, ids=lambda c: c.__name__)
def test_bad_compression_ratio(cls, ratio):
    with pytest.raises((ValueError, TypeError), match="compression_ratio"):
        cls(compression_ratio=ratio)


@pytest.mark.parametrize("ratio", [-0.1, 1.0, math.nan, "0.5"], ids=_ids([-0.1, 1.0, math.nan, "0.5"]))
def test_bad_compression_ratio_through_with_ratio_and_get_press(ratio):
    with pytest.raises((ValueError, TypeError), match="compression_ratio"):
        CurDKVPress(compression_ratio=0.5).with_ratio(ratio)
    with pytest.raises((ValueError, TypeError), match="compression_ratio"):
        curdkv.get_press("snapkv", ratio)


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 2.0, math.nan])
def test_kept_count_bad_ratio(ratio):
    with pytest.raises(ValueError, match="compression_ratio"):
        kept_count(10, ratio)


@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.999, 0])
@pytest.mark.parametrize("cls", PRESS_CLASSES, ids=lambda c: c.__name__)
def test_good_compression_ratio_accepted(cls, ratio):
    press = cls(compression_ratio=ratio)
    assert press.compression_ratio == ratio
    assert isinstance(press.compression_ratio, float)


BAD_PARAMS = [
    (CurDKVPress, {"projection_dim": 0}, "projection_dim"),
    (CurDKVPress, {"projection_dim": -3}, "projection_dim"),
    (CurDKVPress, {"projection_dim": 2.5}, "projection_dim"),
    (CurDKVPress, {"projection_dim": True}, "projection_dim"),
    (CurDKVPress, {"leverage": "foo"}, "leverage"),
    (CurDKVPress, {"leverage": None}, "leverage"),
    (CurDKVPress, {"estimator": "svd"}, "estimator"),
    (CurDKVPress, {"local_window": 0}, "local_window"),
    (CurDKVPress, {"local_window": -16}, "local_window"),
    (CurDKVPress, {"num_sinks": -1}, "num_sinks"),
    (CurDKVPress, {"num_sinks": 1.5}, "num_sinks"),
    (CurDKVPress, {"seed": -1}, "seed"),
    (SnapKVPress, {"kernel_size": 4}, "kernel_size"),
    (SnapKVPress, {"kernel_size": 0}, "kernel_size"),
    (SnapKVPress, {"window_size": 0}, "window_size"),
    (SnapKVPress, {"window_size": -8}, "window_size"),
    (StreamingLLMPress, {"num_sinks": -1}, "num_sinks"),
    (RandomPress, {"seed": -1}, "seed"),
    (ChunkKVPress, {"chunk_size": 0}, "chunk_size"),
    (ChunkKVPress, {"chunk_size": -4}, "chunk_size"),
]


@pytest.mark.parametrize(
    "cls,kwargs,param", BAD_PARAMS, ids=[f"{c.__name__}-{next(iter(k))}={k[next(iter(k))]!r}" for c, k, _ in BAD_PARAMS]
)
def test_bad_press_parameter(cls, kwargs, param):
    with pytest.raises(ValueError, match=param):
        cls(compression_ratio=0.5, **kwargs)


@pytest.mark.parametrize("base", ["snapkv", None, SnapKVPress, object()], ids=["str", "None", "class", "object"])
def test_chunkkv_press_must_be_a_press(base):
    with pytest.raises(TypeError, match="press"):
        ChunkKVPress(compression_ratio=0.5, press=base)


def test_get_press_unknown_name():
    with pytest.raises(ValueError, match="press"):
        curdkv.get_press("nope")


def test_get_press_takes_the_ratio_once():
    assert curdkv.get_press("curdkv", compression_ratio=0.3).compression_ratio == 0.3
    assert curdkv.get_press("curdkv").compression_ratio == 0.0
    with pytest.raises(ValueError, match="compression_ratio given twice"):
        curdkv.get_press("curdkv", 0.5, compression_ratio=0.2)


@pytest.mark.parametrize("spec", ["curdkv:compression_ratio=0.7", "snapkv:window_size=8:compression_ratio=0.1"])
def test_a_spec_does_not_set_the_ratio(spec):
    with pytest.raises(ValueError, match="compression_ratio is not a spec option"):
        curdkv.get_press(spec, 0.5)
    with pytest.raises(ValueError, match="compression_ratio is not a spec option"):
        parse_press_spec(spec)


def test_lava_refuses_a_ratio_its_window_cannot_meet():
    """At 0.9 of 200 tokens the budget is 20 per head, under LAVa's 32-token window: it would keep 16%."""
    press = LAVaPress(compression_ratio=0.9)
    with pytest.raises(ValueError, match=r"budget of 20 tokens .* smaller than the 32 protected"):
        press.layer_keeps([torch.rand(1, 2, 200)] * 3, 200)
    assert sum(LAVaPress(compression_ratio=0.9).layer_keeps([torch.rand(1, 2, 1000)] * 3, 1000)) <= 300


@pytest.mark.parametrize("prefix", [5, b"Answer:", ["A"]], ids=repr)
def test_answer_prefix_must_be_a_string(prefix):
    with pytest.raises(ValueError, match="answer_prefix must be a string or None"):
        curdkv.context.encode_question(None, "What is it?", answer_prefix=prefix)


@pytest.mark.parametrize("window", [1.5, -1, "64", None, True], ids=repr)
def test_query_window_must_be_an_integer(tiny_models, window):
    with pytest.raises(ValueError, match="query_window must be an integer >= 0"):
        curdkv.capture_prefill(tiny_models("tiny-llama"), torch.zeros(1, 8, dtype=torch.long), query_window=window)


@pytest.mark.parametrize("name", sorted(PRESSES))
def test_get_press_known_names(name):
    press = curdkv.get_press(name, 0.25)
    assert isinstance(press, Press)
    assert press.compression_ratio == 0.25
    assert curdkv.get_press(name.upper(), 0.25).describe() == press.describe()


# --------------------------------------------------------------------------- selection


def _scores(n):
    return torch.rand(2, 2, n, generator=torch.Generator().manual_seed(n))


@pytest.mark.parametrize("n,sinks,recent", [(5, 4, 2), (10, 0, 11), (3, 4, 0)])
def test_select_uniform_context_shorter_than_protected(n, sinks, recent):
    with pytest.raises(ValueError, match="num_sinks|window"):
        select_uniform(_scores(n), n, sinks, recent)


@pytest.mark.parametrize("n,n_keep,sinks,recent", [(50, 5, 4, 2), (50, 7, 0, 8), (100, 3, 4, 0)])
def test_select_uniform_budget_below_protected(n, n_keep, sinks, recent):
    with pytest.raises(ValueError, match="compression_ratio"):
        select_uniform(_scores(n), n_keep, sinks, recent)


def test_select_uniform_empty_context():
    with pytest.raises(ValueError, match="empty"):
        select_uniform(torch.zeros(2, 2, 0), 0, 0, 0)


def test_select_uniform_rejects_nan_and_bad_shape():
    scores = _scores(20)
    scores[0, 1, 3] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        select_uniform(scores, 10)
    with pytest.raises(ValueError, match="scores"):
        select_uniform(torch.rand(2, 20), 10)


# --------------------------------------------------------------------------- through the runtime


def _states(n, d=16):
    gen = torch.Generator().manual_seed(n)
    return torch.randn(2, 2, n, d, generator=gen), torch.randn(2, 2, n, d, generator=gen)


@pytest.mark.parametrize(
    "press", [CurDKVPress(compression_ratio=0.5), KNormPress(compression_ratio=0.5)], ids=["curdkv", "knorm"]
)
def test_compress_states_empty_context(press):
    keys, values = _states(0)
    with pytest.raises(ValueError, match="empty"):
        compress_states(press, keys, values, None, None, 0)


def test_compress_states_context_shorter_than_sinks():
    keys, values = _states(3)
    with pytest.raises(ValueError, match="num_sinks"):
        compress_states(CurDKVPress(compression_ratio=0.5, num_sinks=4, **CACHED_STATES), keys, values, None, None, 0)


def test_compress_states_budget_below_sinks():
    keys, values = _states(20)
    with pytest.raises(ValueError, match="compression_ratio"):
        compress_states(StreamingLLMPress(compression_ratio=0.9, num_sinks=4), keys, values, None, None, 0)


def test_snapkv_context_not_longer_than_window():
    keys, values = _states(16)
    queries = torch.randn(2, 4, 16, 16)
    press = SnapKVPress(compression_ratio=0.5, window_size=16)
    view = ScoringView(keys=keys, values=values, queries=queries, module=None, layer_idx=0)
    with pytest.raises(ValueError, match="window_size"):
        press.score(view)


@pytest.mark.parametrize("have", [None, 4])
def test_snapkv_without_enough_queries(have):
    keys, values = _states(40)
    queries = None if have is None else torch.randn(2, 4, have, 16)
    press = SnapKVPress(compression_ratio=0.5, window_size=8)
    view = ScoringView(keys=keys, values=values, queries=queries, module=None, layer_idx=0)
    with pytest.raises(ValueError, match="queries"):
        press.score(view)


@dataclass
class WrongShapePress(Press):
    def score(self, view):
        return torch.zeros(view.keys.shape[0], view.keys.shape[1], view.keys.shape[2] - 1)


def test_compress_states_wrong_score_shape():
    keys, values = _states(20)
    with pytest.raises(ValueError, match="shape"):
        compress_states(WrongShapePress(compression_ratio=0.5), keys, values, None, None, 0)


def test_nan_scores_name_the_press_layer_and_heads():
    from curdkv.runtime.layer import compress_layer

    class NaNHead(curdkv.KNormPress):
        def score(self, view):
            scores = super().score(view)
            scores[0, 1, 5] = math.nan
            return scores

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:  # on CUDA the check runs after the gather is queued
        keys, values = torch.randn(1, 2, 50, 16, device=device), torch.randn(1, 2, 50, 16, device=device)
        for layout in ("dense", "ragged", "masked"):
            with pytest.raises(ValueError, match=r"NaNHead.*returned 1 NaN scores at layer 3, KV heads \[1\].*keys finite"):
                compress_layer(NaNHead(compression_ratio=0.5), keys, values, None, None, 3, layout)


def test_interpreted_on_cpu_needs_the_interpreter(monkeypatch):
    from curdkv.kernels.common import interpreted_on_cpu, on_kernel_device

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"), interpreted_on_cpu():
        pass
    assert not on_kernel_device(torch.zeros(1))
