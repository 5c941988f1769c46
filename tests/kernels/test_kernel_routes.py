"""The CUDA routes, run on CPU: each press's Triton kernels keep the tokens of its torch route.

Inside :func:`curdkv.kernels.common.interpreted_on_cpu` CPU tensors take
the routes that CUDA tensors take (kernel choice, the ragged layout for
every press, checks queued per layer and read back once, the kernels inside
presses, selection, gather and ragged decoding), run by Triton's
interpreter; only the side stream of :mod:`curdkv.runtime.overlap` stays CUDA's. The kernels themselves are checked against slow
references in ``test_topk_kernel.py``, ``test_measure.py`` and
``test_ragged_kernel.py``; these tests check that the library reaches them
and that they change nothing that the torch routes decide.
"""

from __future__ import annotations

import pytest
import torch

import curdkv
import curdkv.kernels.gather
import curdkv.kernels.ragged_attention
import curdkv.presses.curdkv
import curdkv.presses.peak_attention
import curdkv.presses.window
import curdkv.selection
from curdkv.kernels.common import interpreted_on_cpu, on_kernel_device
from curdkv.cache.ragged import RaggedLayer
from conftest import INTERPRETED, random_ids, tiny_model
from helpers import greedy

# Under Triton's interpreter only: on CUDA the kernel routes are the default ones, which the other tests run.
pytestmark = [pytest.mark.kernel, pytest.mark.skipif(
    not INTERPRETED, reason="compares the CUDA routes with the torch routes on CPU, under Triton's interpreter")]

# The kernel entry points each press reaches on the CUDA route: (module that calls it, name there).
LEVERAGE = (curdkv.presses.curdkv, "half_precision_leverage")
SKETCH = (curdkv.presses.curdkv, "transformed_norms")
WINDOW = (curdkv.presses.window, "fused_window_mean")
TOPK = (curdkv.selection, "topk_in_order")
ADAPTIVE = (curdkv.selection, "adaptive_by_kernels")
GATHER = (curdkv.kernels.gather, "gather_kv")
PEAK = (curdkv.presses.peak_attention, "peak_attention")
# Press specs: the sketch's kernel needs r <= D, and these heads are 16 wide.
ROUTES = {
    "curdkv": [LEVERAGE, TOPK, GATHER],
    "curdkv-sketch:projection_dim=8": [SKETCH, TOPK, GATHER],
    "adacurdkv": [LEVERAGE, ADAPTIVE],
    "adacurdkv-sketch:projection_dim=8": [SKETCH, ADAPTIVE],
    "snapkv": [WINDOW, TOPK, GATHER],
    "adasnapkv": [WINDOW, ADAPTIVE],
    "knorm": [TOPK, GATHER],
    "chunkkv": [WINDOW],
    "curdkv:layer_budget=context_attention:leverage_floor=0.25": [LEVERAGE, PEAK],
}


def spy_on(monkeypatch, entries) -> dict:
    """Count the calls of each entry point, still calling it."""
    calls = {}
    for module, name in entries:
        real = getattr(module, name)
        calls[name] = 0

        def spy(*args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, name, spy)
    return calls


def kept(layer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every head's kept keys and values, flat and in head order, and the tokens per head, whatever the layout."""
    if isinstance(layer, RaggedLayer):
        return layer.context_keys, layer.context_values, layer.lengths
    b, h, k, _ = layer.keys.shape
    flat = (x.reshape(-1, x.shape[-1]) for x in (layer.keys, layer.values))
    return *flat, torch.full((b, h), k)


@pytest.fixture(scope="module")
def half_model():
    # float16: Triton's interpreter converts bfloat16 wrongly. Head size 16, the kernels' smallest.
    return tiny_model("tiny-llama", torch.float16)


@pytest.mark.parametrize("name", list(ROUTES))
def test_kernel_routes_keep_the_tokens_of_the_torch_routes(half_model, name, monkeypatch):
    press = curdkv.get_press(name, 0.6)
    capture = curdkv.capture_prefill(half_model, random_ids(256, seed=3), query_window=press.query_window)
    by_torch = capture.build_cache(press)
    calls = spy_on(monkeypatch, ROUTES[name])
    with interpreted_on_cpu():
        capture.forget_scores()  # scored again, by the kernels
        by_kernels = capture.build_cache(press)
    layers = len(by_kernels.layers)
    assert all(count >= layers for count in calls.values()), calls  # every layer took every kernel
    assert max(by_kernels.nbytes(), by_torch.nbytes()) < capture.nbytes()
    for a, b in zip(by_torch.layers, by_kernels.layers):
        assert isinstance(b, RaggedLayer)  # as on CUDA: every press takes the ragged layout and its kernel
        for x, y in zip(kept(a), kept(b)):
            assert torch.equal(x, y)


def test_checks_on_the_kernel_route_name_the_layer(half_model):
    # On CUDA the checks are queued per layer and read back once; a NaN score still raises, naming the layer.
    class NaNAtLayer1(curdkv.presses.KNormPress):
        def score(self, view):
            scores = super().score(view)
            return scores.fill_(float("nan")) if view.layer_idx == 1 else scores

    capture = curdkv.capture_prefill(half_model, random_ids(128, seed=5))
    with interpreted_on_cpu(), pytest.raises(ValueError, match="NaN scores at layer 1"):
        capture.build_cache(NaNAtLayer1(0.5))
    ids = random_ids(128, seed=5)
    with interpreted_on_cpu(), curdkv.compress(half_model, NaNAtLayer1(0.5)), \
            pytest.raises(ValueError, match="NaN scores at layer 1"):
        half_model(input_ids=ids)


def test_ragged_decoding_by_the_kernel_generates_the_reference_tokens(half_model, monkeypatch):
    ids = random_ids(200, seed=4)
    cache = curdkv.capture_prefill(half_model, ids).build_cache(curdkv.get_press("adacurdkv", 0.5))
    assert all(isinstance(layer, RaggedLayer) for layer in cache.layers)
    want = greedy(half_model, ids, cache, 6)
    calls = spy_on(monkeypatch, [(curdkv.kernels.ragged_attention, "ragged_attention_triton")])
    cache = curdkv.capture_prefill(half_model, ids).build_cache(curdkv.get_press("adacurdkv", 0.5))
    with interpreted_on_cpu():
        got = greedy(half_model, ids, cache, 6)
    assert calls["ragged_attention_triton"] == 5 * len(cache.layers)
    assert got == want


def test_interpreted_on_cpu_restores_the_torch_routes_after_an_error():
    x = torch.zeros(1, 1, 4, 16)
    with pytest.raises(KeyError), interpreted_on_cpu():
        assert on_kernel_device(x)
        raise KeyError("inside")
    assert not on_kernel_device(x)

