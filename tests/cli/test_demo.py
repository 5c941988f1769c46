"""The demo on the bundled model: batched answers equal each configuration asked alone."""

from __future__ import annotations

import pytest
import torch

import curdkv
from curdkv.cli.demo import DemoSettings, format_results, ratio_groups, run_demo
from curdkv.eval.needle import needle_samples
from curdkv.models import default_dtype

from conftest import load_smollm2

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def smollm2_float32():
    """In float32, as the demo runs on CPU: in bf16 the batched and the lone answer of a degraded
    context can part at a near-tie (CurDKV at 90% on this needle, seen between two sdpa paths)."""
    return load_smollm2("float32")


def test_demo_answers_each_configuration_as_it_would_be_answered_alone(smollm2_float32, monkeypatch):
    model, tokenizer = smollm2_float32
    monkeypatch.setattr("curdkv.cli.demo.load_model", lambda *args, **kwargs: (model, tokenizer))
    settings = DemoSettings(presses=("full", "curdkv", "snapkv", "streamingllm"), ratios=(0.5, 0.9), samples=1,
                            context_tokens=1024, seed=4)
    records = run_demo(settings, progress=False)
    assert [(r["method"], r["compression_ratio"]) for r in records] == [
        ("full", 0.0), ("curdkv", 0.5), ("curdkv", 0.9), ("snapkv", 0.5), ("snapkv", 0.9),
        ("streamingllm", 0.5), ("streamingllm", 0.9)]
    sample = needle_samples(tokenizer, 1, settings.context_tokens, seed=settings.seed)[0]
    capture = curdkv.capture_prefill(model, sample.context, tokenizer)
    for record in records:
        press = None if record["method"] == "full" else curdkv.get_press(record["method"], record["compression_ratio"])
        alone = curdkv.CompressedContext.from_capture(model, tokenizer, capture, press)
        assert record["answers"] == [alone.ask(sample.question, settings.max_new_tokens, sample.answer_prefix)]
        assert record["kv_bytes"] == alone.nbytes()
    full = records[0]
    assert full["correct"] == 1  # SmolLM2 finds this 1K needle with the full cache
    assert records[2]["kv_bytes"] < 0.11 * full["kv_bytes"]
    table = format_results(records)
    assert "| full" in table and "float32" in table  # the fixture's dtype, named under the table


def test_demo_keeps_every_context_query_for_a_press_that_reads_them(smollm2_float32, monkeypatch):
    model, tokenizer = smollm2_float32
    monkeypatch.setattr("curdkv.cli.demo.load_model", lambda *args, **kwargs: (model, tokenizer))
    spec = "curdkv:layer_budget=context_attention:leverage_floor=0.25"
    settings = DemoSettings(presses=("full", spec), ratios=(0.7,), samples=1, context_tokens=512, seed=4)
    record = run_demo(settings, progress=False)[1]
    sample = needle_samples(tokenizer, 1, settings.context_tokens, seed=settings.seed)[0]
    press = curdkv.get_press(spec, 0.7)
    capture = curdkv.capture_prefill(model, sample.context, tokenizer, query_window=press.query_window)
    alone = curdkv.CompressedContext.from_capture(model, tokenizer, capture, press)
    assert record["method"] == spec
    assert record["answers"] == [alone.ask(sample.question, settings.max_new_tokens, sample.answer_prefix)]
    assert record["kv_bytes"] == alone.nbytes()


def test_ratio_groups_keep_the_order_of_configurations():
    configs = [("full", 0.0, None), ("a", 0.5, 1), ("a", 0.9, 2), ("b", 0.5, 3), ("b", 0.9, 4)]
    assert ratio_groups(configs) == [[configs[0]], [configs[1], configs[3]], [configs[2], configs[4]]]


def test_default_dtype_is_float32_on_cpu_and_bfloat16_on_gpus():
    assert default_dtype("cpu") == default_dtype(torch.device("cpu")) == torch.float32
    assert default_dtype("cuda") == default_dtype(torch.device("cuda", 1)) == torch.bfloat16
    assert default_dtype(None) == (torch.bfloat16 if torch.cuda.is_available() else torch.float32)
