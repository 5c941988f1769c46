"""KVzip: chunk scores against a float64 loop, the reconstruction passes against transformers' eager
attention over the whole sequence, both compression paths, and the budgets across layers."""

from __future__ import annotations

import pytest
import torch

import curdkv
from conftest import random_ids, tiny_model
from curdkv.cache.ragged import RaggedLayer
from curdkv.presses import KVzipPress, ScoringView, get_press
from curdkv.presses.kvzip import FIRST_PROMPT, LATER_PROMPT
from curdkv.runtime.reconstruction import reconstruction_scores
from test_context import ByteTokenizer, _text


def test_chunk_scores_match_a_float64_loop():
    g = torch.Generator().manual_seed(0)
    b, h, h_kv, q, s, c, d = 1, 4, 2, 5, 2, 7, 8
    queries = torch.randn(b, h, q, d, generator=g)
    sink, chunk, own = (torch.randn(b, h_kv, n, d, generator=g) for n in (s, c, q))
    scores = KVzipPress.chunk_scores(queries, sink, chunk, own, 0.3)
    expected = torch.zeros(b, h_kv, c, dtype=torch.float64)
    for head in range(h):
        j = head // (h // h_kv)
        for i in range(q):
            keys = torch.cat([sink[0, j], chunk[0, j], own[0, j, : i + 1]]).double()
            p = torch.softmax(keys @ queries[0, head, i].double() * 0.3, 0)
            expected[0, j] = torch.maximum(expected[0, j], p[s : s + c])
    torch.testing.assert_close(scores.double(), expected, rtol=1e-5, atol=1e-7)


def test_reconstruction_scores_equal_eager_attention_restricted_to_the_scored_keys():
    """The same scores from transformers' eager attention over context + pass, renormalised over the keys KVzip sees."""
    model = tiny_model("tiny-llama")
    eager, _ = curdkv.load_model("random:tiny-llama", dtype=torch.float32, device="cpu", attn_implementation="eager")
    tokenizer = ByteTokenizer()
    text = _text(50, 3)
    press = KVzipPress(0.5, chunk_size=20, num_sinks=2, previous_tail=3)
    capture = curdkv.capture_prefill(model, text, tokenizer)
    got = reconstruction_scores(capture, press)
    ids = capture.input_ids
    n = ids.shape[1]
    encode = lambda t: tokenizer(t).input_ids  # noqa: E731
    for start in range(0, n, 20):
        end = min(start + 20, n)
        prompt = encode(FIRST_PROMPT) if start == 0 else torch.cat([encode(LATER_PROMPT), ids[:, start - 3 : start]], 1)
        pass_ids = torch.cat([prompt, encode("\n"), ids[:, start:end]], 1)
        q = pass_ids.shape[1]
        out = eager(input_ids=torch.cat([ids, pass_ids], 1), output_attentions=True)
        sinks = min(2, start)
        columns = torch.cat([torch.arange(sinks), torch.arange(start, end), torch.arange(n, n + q)])
        for layer, attention in enumerate(out.attentions):
            p = attention[0, :, n:][:, :, columns].double()  # [H, q, keys]
            p = p / p.sum(-1, keepdim=True)
            chunk = p[:, :, sinks : sinks + end - start].amax(1)  # [H, C]
            expected = chunk.view(2, 2, -1).amax(1)  # the max over each KV head's group
            torch.testing.assert_close(got[layer][0, :, start:end].double(), expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-qwen3"])
@pytest.mark.parametrize("layerwise", [False, True])
def test_both_paths_keep_the_same_tokens(arch, layerwise):
    model, tokenizer = tiny_model(arch), ByteTokenizer()
    text = _text(120, 5)
    press = KVzipPress(0.6, chunk_size=48, layerwise=layerwise)
    swept = curdkv.CompressedContext.from_capture(model, tokenizer, curdkv.capture_prefill(model, text, tokenizer),
                                                  press)
    alone = curdkv.prefill(model, tokenizer, text, press)
    for a, b in zip(swept.cache.layers, alone.cache.layers):
        assert isinstance(a, RaggedLayer) and isinstance(b, RaggedLayer)
        assert torch.equal(a.lengths, b.lengths) and torch.equal(a.context_keys, b.context_keys)
    kept = [int(layer.lengths.sum()) for layer in alone.cache.layers]
    heads = alone.cache.layers[0].lengths.numel()
    n = alone.context_length
    target = n - int(n * 0.6)
    if layerwise:
        assert kept == [target * heads] * len(kept)
    else:  # one threshold over the model: the total is the budget, the layers' shares differ
        assert abs(sum(kept) - target * heads * len(kept)) <= len(kept) * heads
    assert alone.ask("what?", 4) == swept.ask("what?", 4)


def test_layer_keeps_spread_one_threshold_over_layers():
    press = KVzipPress(0.5, num_sinks=1)
    low, high = torch.zeros(1, 2, 10), torch.ones(1, 2, 10)
    low[..., 5:] = 2.0  # half of layer 0's tokens beat every token of layer 1
    # Layer 0's five 2.0s and the sink beat everything; the rest of the budget goes to layer 1's ties.
    keeps = press.layer_keeps([low, high], 10)
    assert sum(keeps) == 10 and keeps[0] >= 5
    keeps = press.layer_keeps([high * 3, low * 0.1], 10)
    # 20 of the 40 entries: both layers' sinks, then 16 of layer 0's tokens, which outscore layer 1's.
    assert keeps == [9, 1]
    assert KVzipPress(0.5, num_sinks=1, layerwise=True).layer_keeps([low, high], 10) == [5, 5]


def test_kvzip_refuses_to_run_without_what_it_needs():
    model = tiny_model("tiny-llama")
    with pytest.raises(ValueError, match="needs the tokenizer: curdkv.compress"):
        with curdkv.compress(model, KVzipPress(0.5)):
            pass
    capture = curdkv.capture_prefill(model, random_ids(40))
    with pytest.raises(ValueError, match="needs the tokenizer: pass it to"):
        capture.build_cache(KVzipPress(0.5))
    view = ScoringView(keys=torch.zeros(1, 1, 4, 8), values=torch.zeros(1, 1, 4, 8), queries=None, module=None,
                       layer_idx=0)
    with pytest.raises(ValueError, match="kvzip scores come from reconstructing the context"):
        KVzipPress(0.5).score(view)
    with pytest.raises(ValueError, match="chunk_size must be an integer >= 1"):
        KVzipPress(0.5, chunk_size=0)
    assert get_press("kvzip-layerwise", 0.3).layerwise and get_press("kvzip", 0.3).head_adaptive
