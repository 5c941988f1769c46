"""The lean decode step against transformers' forward: same logits, same K/V written, on every supported architecture."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import curdkv
from conftest import TINY_ARCHS, tiny_model
from curdkv.attention.function import using_curdkv_attention
from curdkv.cache.fixed import FixedCapacityCache
from curdkv.runtime import graph_decode, lean_step
from curdkv.runtime.lean_step import LeanStep, lean_step_unsupported
from curdkv.transformers_compat import forward_with_cache
from test_context import ByteTokenizer, _text


def _fixed(model, press, n=70):
    ctx = curdkv.prefill(model, ByteTokenizer(), _text(n, 4), press)
    return ctx, FixedCapacityCache.from_cache(ctx.cache, 8)


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("press", [None, curdkv.AdaCurDKVPress(0.5, num_sinks=2)], ids=["full", "adacurdkv"])
def test_lean_step_gives_transformers_logits_and_writes_the_same_kv(arch, press):
    model = tiny_model(arch)
    ctx, fixed = _fixed(model, press)
    token = torch.tensor([[17]])
    position = torch.tensor([[ctx.context_length]])
    with using_curdkv_attention(model):
        expected = forward_with_cache(model, fixed, input_ids=token, position_ids=position, use_cache=True,
                                      logits_to_keep=1).logits[:, -1]
        written = [(layer.tail_keys[:, :, 0].clone(), layer.tail_values[:, :, 0].clone()) for layer in fixed.layers]
        for layer in fixed.layers:
            layer.tail_keys.zero_(), layer.tail_values.zero_()
        logits = LeanStep(model, fixed)(token, position)
    assert logits.shape == expected.shape
    assert float((logits - expected).abs().max()) < 1e-5 * float(expected.abs().max())
    for layer, (k, v) in zip(fixed.layers, written):
        assert torch.allclose(layer.tail_keys[:, :, 0], k, atol=1e-6) and torch.equal(layer.tail_values[:, :, 0], v)


def test_unsupported_models_are_named():
    def model_with(**config):
        base = dict(model_type="llama", hidden_act="silu", pretraining_tp=1, layer_types=None)
        return SimpleNamespace(config=SimpleNamespace(**{**base, **config}))

    assert "model_type 'gemma'" in lean_step_unsupported(model_with(model_type="gemma"))
    assert "hidden_act 'gelu'" in lean_step_unsupported(model_with(hidden_act="gelu"))
    assert "sliding-window" in lean_step_unsupported(model_with(layer_types=["sliding_attention"]))
    assert lean_step_unsupported(tiny_model("tiny-qwen3")) is None
    with pytest.raises(ValueError, match="cannot use the lean decode step: model_type 'gemma'"):
        LeanStep(model_with(model_type="gemma"), None)


def test_a_lean_step_that_disagrees_is_dropped_with_a_warning(monkeypatch):
    """A wrong lean step (its MLP zeroed here) is caught on the model's first decode and never used."""
    model = curdkv.load_model("random:tiny-llama", dtype=torch.float32, device="cpu")[0]  # a model of its own
    monkeypatch.setattr(lean_step, "silu_mul", lambda gate, up: torch.zeros_like(gate))
    ctx, _ = _fixed(model, None)
    expected = ctx.ask("q?", 6, cuda_graph=False)
    with pytest.warns(UserWarning, match="lean decode step's logits differ from transformers'"):
        tokens = _graph_tokens(ctx, "q?", 6)
    assert ",".join(map(str, tokens)) == expected
    assert graph_decode._LEAN_CHECKED[model] is False
    assert _graph_tokens(ctx, "q?", 6) == tokens  # no second warning: the model is known


def _graph_tokens(ctx, question, steps):
    from test_graph_decode import fixed_tokens

    return fixed_tokens(ctx, question, steps, capture=False)



@pytest.mark.kernel
@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-qwen2"])  # qwen2: q/k/v biases
def test_grouped_gemv_keeps_the_lean_steps_tokens(arch, monkeypatch):
    """The lean step chooses the same tokens with its products through cuBLAS/torch and through the GEMV kernels."""
    from conftest import KERNEL_DEVICE
    from curdkv.kernels import gemv
    from curdkv.kernels.common import interpreted_on_cpu
    from test_graph_decode import fixed_tokens

    # float16: Triton's interpreter converts bfloat16 wrongly.
    model = curdkv.load_model(f"random:{arch}", dtype=torch.float16, device=KERNEL_DEVICE)[0]
    ctx = curdkv.prefill(model, ByteTokenizer(), _text(60, 2), None)
    calls = {"grouped_gemv": 0, "gated_gemv": 0}
    for name in calls:
        def spy(*args, _real=getattr(lean_step, name), _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)
        monkeypatch.setattr(lean_step, name, spy)
    tokens = {}
    with interpreted_on_cpu() if KERNEL_DEVICE == "cpu" else torch.no_grad():
        for mode in lean_step.GEMV_MODES:
            before = dict(calls)
            with lean_step.using_gemv(mode):
                tokens[mode] = fixed_tokens(ctx, "go", 8, capture=False)
            used = {n: calls[n] - before[n] for n in calls}
            assert (used["gated_gemv"] > 0) == (mode != "torch"), (mode, used)
            assert gemv.gemv_applies(torch.zeros(1, 4, dtype=torch.float16, device=KERNEL_DEVICE), ())
    assert graph_decode._LEAN_CHECKED[model] is True
    assert tokens["grouped"] == tokens["torch"] and tokens["all"] == tokens["torch"], tokens
    assert len(tokens["torch"]) > 0


def test_an_unknown_gemv_route_is_refused():
    with pytest.raises(ValueError, match="gemv must be one of"):
        LeanStep(tiny_model("tiny-llama"), None, gemv="cublas")
    with pytest.raises(ValueError, match="gemv must be one of"), lean_step.using_gemv("fast"):
        pass
