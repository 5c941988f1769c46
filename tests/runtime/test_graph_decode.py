"""Decoding over a fixed-capacity cache, eagerly and replayed as a CUDA graph, against the eager decode loop.

On CPU the fixed-capacity path runs eagerly with the reference attention
(``capture=False``): it must choose the tokens the plain loop chooses. On
CUDA the replayed graph must give the tokens of the same step run eagerly
(the same kernels: bit for bit) and, in float32, those of the plain loop,
across GQA groups, head dims, batch sizes, rows of very different lengths
and heads that kept only their sinks.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import curdkv
from conftest import random_ids, tiny_model
from curdkv.attention.function import using_curdkv_attention
from curdkv.cache.dense import CompressedCache
from curdkv.cache.fixed import FixedCapacityCache, TailState
from curdkv.cache.ragged import RaggedLayer
from curdkv.context import CompressedContext, _stop_ids, ask_many, encode_question
from curdkv.runtime import graph_decode, graph_generate, hooks
from curdkv.runtime.hooks import compress
from curdkv.transformers_compat import cache_keyword
from curdkv.runtime.graph_decode import GraphDecoder, answer_on_graph
from test_context import ByteTokenizer, _text

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="CUDA graphs need a CUDA device; run on the GPU machine")
PRESSES = [None, curdkv.CurDKVPress(0.5, num_sinks=2), curdkv.AdaCurDKVPress(0.6, num_sinks=2),
           curdkv.StreamingLLMPress(0.7, num_sinks=2)]


def llama(group: int, head_dim: int, dtype=torch.float32, device="cpu", layers=2):
    """A small random Llama with ``8 // group`` KV heads of ``head_dim`` (seeded)."""
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=layers, num_attention_heads=8,
                         num_key_value_heads=8 // group, head_dim=head_dim, vocab_size=256,
                         max_position_embeddings=8192, tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()


def fixed_tokens(ctx, question: str, steps: int, capture: bool, lean: bool | None = None) -> list[int]:
    """The tokens answer_on_graph chooses for ``question`` on ``ctx``, up to the first end token."""
    device = next(ctx.model.parameters()).device
    ids = encode_question(ctx.tokenizer, question, device=device)
    positions = torch.arange(ctx.context_length, ctx.context_length + ids.shape[1], device=device)[None]
    stop = sorted(_stop_ids(ctx.model, ctx.tokenizer)) or [-1]
    with using_curdkv_attention(ctx.model):
        tokens = answer_on_graph(ctx.model, ctx.cache, ids, positions, torch.tensor(stop, device=device), steps,
                                 capture, lean)[0].tolist()
    ends = [i for i, t in enumerate(tokens) if t in stop]
    return tokens[: ends[0]] if ends else tokens


def eager_tokens(ctx, question: str, steps: int) -> list[int]:
    answer = ctx.ask(question, steps, cuda_graph=False)
    return [int(t) for t in answer.split(",")] if answer else []


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-qwen2", "tiny-qwen3"])
@pytest.mark.parametrize("press", PRESSES, ids=lambda p: p.name if p else "full")
def test_fixed_capacity_decoding_chooses_the_tokens_of_the_eager_loop(arch, press):
    model = tiny_model(arch)
    ctx = curdkv.prefill(model, ByteTokenizer(), _text(90, 3), press)
    before = [(layer.keys.clone(), layer.values.clone()) for layer in ctx.cache.layers if hasattr(layer, "values")]
    assert fixed_tokens(ctx, "what now?", 12, capture=False) == eager_tokens(ctx, "what now?", 12)
    after = [(layer.keys, layer.values) for layer in ctx.cache.layers if hasattr(layer, "values")]
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(before, after)), "the context's cache was modified"


def test_fixed_capacity_rows_of_an_ask_many_batch_decode_as_alone():
    model = tiny_model("tiny-llama")
    tokenizer = ByteTokenizer()
    contexts = [curdkv.prefill(model, tokenizer, _text(n, n), press) for n, press in zip((30, 150, 70, 400), PRESSES)]
    requests = [(ctx, _text(3 + i, i)) for i, ctx in enumerate(contexts)]
    alone = [ctx.ask(q, 9, cuda_graph=False) for ctx, q in requests]
    # The graph path with capture=False: the same device-side steps, run eagerly on CPU.
    real = graph_decode.GraphDecoder.__init__

    def eager_init(self, *args, **kwargs):
        real(self, *args, **{**kwargs, "capture": False})

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(graph_decode.GraphDecoder, "__init__", eager_init)
        patch.setattr(curdkv.context, "resolve_cuda_graph", lambda cuda_graph, device: True)
        assert ask_many(requests, 9) == alone


def test_questions_of_different_lengths_read_by_the_step_give_each_rows_answer_alone(monkeypatch):
    """ask_many's graph path feeds every row its own question one token per step, rows ending at different steps."""
    model = tiny_model("tiny-llama")
    probe = curdkv.prefill(model, ByteTokenizer(), _text(50, 0))
    eos = eager_tokens(probe, "q0", 6)[3]  # an end token some rows meet early
    tokenizer = ByteTokenizer(eos)
    contexts = [curdkv.prefill(model, tokenizer, _text(n, n), press) for n, press in zip((20, 300, 150, 64), PRESSES)]
    requests = [(ctx, f"q{i}" + "?" * (5 * i)) for i, ctx in enumerate(contexts)]  # questions of 2 to 17 characters
    alone = [ctx.ask(q, 10, cuda_graph=False) for ctx, q in requests]
    assert len({len(a) for a in alone}) > 1  # the rows' answers end at different steps
    built = []
    real = graph_decode.GraphDecoder.__init__

    def eager_init(self, *args, **kwargs):
        built.append(kwargs.get("forced"))
        real(self, *args, **{**kwargs, "capture": False})

    monkeypatch.setattr(graph_decode.GraphDecoder, "__init__", eager_init)
    monkeypatch.setattr(curdkv.context, "resolve_cuda_graph", lambda cuda_graph, device: True)
    assert ask_many(requests, 10) == alone  # 4 rows, questions longer than 3 tokens per row: prefilled
    assert len(built) == 1 and built[0] is None
    monkeypatch.setattr(curdkv.context, "QUESTION_TOKENS_FED_PER_ROW", 10)
    assert ask_many(requests, 10) == alone
    assert len(built) == 2 and built[1] is not None  # one decoder, fed the questions


def test_a_finished_row_stops_attending():
    """A row marked inactive reads nothing: its attention output is zero, the others' are unchanged."""
    model = tiny_model("tiny-llama")
    ctx = curdkv.prefill(model, ByteTokenizer(), _text(60, 1), curdkv.CurDKVPress(0.5))
    stacked = CompressedCache.from_layers([RaggedLayer.concat([RaggedLayer.from_dense(l.keys, l.values, 60)] * 2)
                                           for l in ctx.cache.layers])
    fixed = FixedCapacityCache.from_cache(stacked, 4)
    layer = fixed.layers[0]
    k = torch.randn(2, 2, 1, 16)
    query = torch.randn(2, 4, 1, 16)
    from curdkv.attention.reference import ragged_attention_reference

    both = ragged_attention_reference(query, layer.update(k, k)[0])
    fixed.state.active[1] = 0
    one = ragged_attention_reference(query, layer.update(k, k)[0])
    assert torch.equal(one[0], both[0]) and bool((one[1] == 0).all()) and bool(both[1].abs().sum() > 0)


def test_the_fixed_capacity_is_enforced():
    state = TailState(1, 3, "cpu")
    state.write_index(2)
    state.advance(2)
    with pytest.raises(ValueError, match="holds 3 appended tokens; 2 are written and 2 more do not fit"):
        state.write_index(2)
    with pytest.raises(ValueError, match="capacity must be an integer >= 1"):
        FixedCapacityCache.from_cache(CompressedCache(), 0)


def test_cuda_graph_option_is_checked():
    model = tiny_model("tiny-llama")
    ctx = curdkv.prefill(model, ByteTokenizer(), _text(40, 0))
    with pytest.raises(ValueError, match="cuda_graph must be None, True or False, got 'yes'"):
        ctx.ask("q?", 4, cuda_graph="yes")
    if not CUDA:
        with pytest.raises(ValueError, match="cuda_graph=True needs a CUDA device"):
            ctx.ask("q?", 4, cuda_graph=True)


def test_cpu_decoding_never_builds_a_fixed_capacity_cache(monkeypatch):
    """On CPU the default is the eager loop: nothing of the graph path runs (so CPU decoding cannot get slower)."""
    def refuse(*args, **kwargs):
        raise AssertionError("the graph path ran on CPU")

    monkeypatch.setattr(curdkv.context, "answer_on_graph", refuse)
    monkeypatch.setattr(curdkv.context, "FixedCapacityCache", refuse)
    model = tiny_model("tiny-llama")
    ctx = curdkv.prefill(model, ByteTokenizer(), _text(40, 0), curdkv.CurDKVPress(0.5))
    assert ctx.ask("q?", 5)
    assert ask_many([(ctx, "q?"), (ctx, "r?")], 5)


# --- CUDA: the replayed graph ----------------------------------------------------------------------

SHAPES = [(1, 64), (2, 128), (4, 64), (8, 128)]  # (GQA group, head dim)


@needs_cuda
@pytest.mark.parametrize("lean", [None, False], ids=["lean-step", "transformers-forward"])
@pytest.mark.parametrize("group,head_dim", SHAPES)
@pytest.mark.parametrize("press", PRESSES, ids=lambda p: p.name if p else "full")
def test_graph_replay_equals_the_eager_step_and_the_eager_loop(group, head_dim, press, lean):
    model = llama(group, head_dim, device="cuda")
    ctx = curdkv.prefill(model, ByteTokenizer(), _text(700, group), press)
    replayed = fixed_tokens(ctx, "and then?", 24, capture=True, lean=lean)
    assert replayed == fixed_tokens(ctx, "and then?", 24, capture=False, lean=lean)  # same kernels, same bits
    assert replayed == eager_tokens(ctx, "and then?", 24)  # float32: the plain loop's tokens


@needs_cuda
@pytest.mark.parametrize("group,head_dim", [(2, 64), (4, 128)])
def test_graph_replay_in_bfloat16_equals_its_eager_step(group, head_dim):
    model = llama(group, head_dim, dtype=torch.bfloat16, device="cuda")
    ctx = curdkv.prefill(model, ByteTokenizer(), _text(900, 7), curdkv.AdaCurDKVPress(0.8))
    assert fixed_tokens(ctx, "so?", 20, capture=True) == fixed_tokens(ctx, "so?", 20, capture=False)


@needs_cuda
@pytest.mark.parametrize("group,head_dim", [(2, 64), (4, 128)])
def test_graph_replay_over_heads_that_kept_only_their_sinks(group, head_dim):
    """A ragged cache where some heads keep one token (the sink) and others thousands."""
    model = llama(group, head_dim, device="cuda")
    tokenizer = ByteTokenizer()
    full = curdkv.prefill(model, tokenizer, _text(2000, 5))
    layers = []
    for i, layer in enumerate(full.cache.layers):
        n = layer.keys.shape[2]
        keep = torch.zeros(layer.keys.shape[:3], dtype=torch.bool, device="cuda")
        keep[..., 0] = True
        keep[:, 1::2, :] = True  # odd heads keep everything, even heads only the sink
        if i == 1:
            keep[:, 0, n // 3:] = True  # one more shape: a head keeping the last two thirds
        layers.append(RaggedLayer.from_mask(layer.keys, layer.values, keep))
    ctx = CompressedContext(model, tokenizer, CompressedCache.from_layers(layers), full.context_length, None)
    replayed = fixed_tokens(ctx, "ok?", 16, capture=True)
    assert replayed == fixed_tokens(ctx, "ok?", 16, capture=False)
    assert replayed == eager_tokens(ctx, "ok?", 16)


@needs_cuda
@pytest.mark.parametrize("group,head_dim", [(1, 128), (4, 64)])
def test_ask_many_on_the_graph_answers_rows_of_very_different_lengths_as_alone(group, head_dim):
    model = llama(group, head_dim, device="cuda")
    probe = curdkv.prefill(model, ByteTokenizer(), _text(50, 0))
    eos = eager_tokens(probe, "q0", 6)[3]  # an end token some rows meet early, so rows stop at different steps
    tokenizer = ByteTokenizer(eos)
    lengths = (20, 3000, 150, 1200, 64, 2500)
    contexts = [curdkv.prefill(model, tokenizer, _text(n, i), PRESSES[i % len(PRESSES)])
                for i, n in enumerate(lengths)]
    requests = [(ctx, f"q{i}" + "?" * i) for i, ctx in enumerate(contexts)]
    alone = [ctx.ask(q, 14, cuda_graph=False) for ctx, q in requests]
    assert ask_many(requests, 14, cuda_graph=True) == alone
    assert ask_many(requests, 14, cuda_graph=False) == alone


@needs_cuda
def test_ask_uses_the_graph_by_default_on_cuda(monkeypatch):
    captured = []
    real = GraphDecoder.start

    def spy(self):
        real(self)
        captured.append(self.graph is not None)

    monkeypatch.setattr(GraphDecoder, "start", spy)
    model = llama(2, 64, device="cuda")
    ctx = curdkv.prefill(model, ByteTokenizer(), _text(300, 2), curdkv.CurDKVPress(0.5))
    assert ctx.ask("q?", 8) == ctx.ask("q?", 8, cuda_graph=False)
    assert captured == [True]


@needs_cuda
def test_a_failed_capture_warns_and_decodes_eagerly(monkeypatch):
    def broken_graph(*args, **kwargs):
        raise RuntimeError("capture not possible here")

    monkeypatch.setattr(torch.cuda, "graph", broken_graph)
    model = llama(2, 64, device="cuda")
    ctx = curdkv.prefill(model, ByteTokenizer(), _text(300, 2), curdkv.CurDKVPress(0.5))
    with pytest.warns(UserWarning, match="CUDA-graph capture failed .*capture not possible here"):
        answer = ctx.ask("q?", 8)
    assert answer == ctx.ask("q?", 8, cuda_graph=False)


# --- model.generate inside curdkv.compress -----------------------------------------------------------


class _EagerLogitsGraph(graph_generate.LogitsGraph):
    """The logits step graph run eagerly (CPU): the same device-side step, counted."""

    built: list[int] = []
    calls = 0

    def __init__(self, model, cache, capture=True, lean=None):
        super().__init__(model, cache, capture=False, lean=lean)
        type(self).built.append(cache.state.capacity)

    def __call__(self, input_ids, position_ids):
        type(self).calls += 1
        return super().__call__(input_ids, position_ids)


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-qwen3"])
@pytest.mark.parametrize("press", [curdkv.CurDKVPress(0.5, num_sinks=2), curdkv.AdaCurDKVPress(0.6, num_sinks=2),
                                   curdkv.SnapKVPress(0.7, window_size=4), curdkv.LAVaPress(0.5),
                                   curdkv.LookaheadQCachePress(0.5, lookahead_tokens=3)], ids=lambda p: p.name)
def test_generate_under_compress_decodes_through_the_step_graph(arch, press, monkeypatch):
    """generate's decode steps go through the logits graph (growing its capacity twice) and give the same tokens."""
    model = tiny_model(arch)
    ids = random_ids(90, batch=2, seed=3)
    with compress(model, press, cuda_graph=False):
        expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=40, min_new_tokens=40,
                                  do_sample=False)
    monkeypatch.setattr(hooks, "resolve_cuda_graph", lambda cuda_graph, device: cuda_graph is not False)
    monkeypatch.setattr(graph_generate, "FIRST_CAPACITY", 16)
    monkeypatch.setattr(graph_generate, "LogitsGraph", _EagerLogitsGraph)
    _EagerLogitsGraph.built, _EagerLogitsGraph.calls = [], 0
    cache = CompressedCache()
    with compress(model, press):
        got = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=40, min_new_tokens=40,
                             do_sample=False, **{cache_keyword(model): cache})
    assert torch.equal(got, expected)
    assert _EagerLogitsGraph.calls == 39 and _EagerLogitsGraph.built == [16, 32, 64]
    assert cache.get_seq_length() == 90 + 39  # the caller's cache holds the generated tokens, at their positions
    assert "forward" not in model.__dict__  # the wrapper is gone with the block


def test_generate_with_cuda_graph_true_needs_cuda_and_refuses_max_cache_tokens():
    model = tiny_model("tiny-llama")
    if not CUDA:
        with pytest.raises(ValueError, match="cuda_graph=True needs a CUDA device"):
            with compress(model, curdkv.CurDKVPress(0.5), cuda_graph=True):
                pass
    with pytest.raises(ValueError, match="cuda_graph must be None, True or False"):
        with compress(model, curdkv.CurDKVPress(0.5), cuda_graph=1):
            pass


@needs_cuda
@pytest.mark.parametrize("press", [curdkv.CurDKVPress(0.5), curdkv.AdaCurDKVPress(0.7)], ids=lambda p: p.name)
def test_generate_under_compress_on_cuda_replays_the_graph(press):
    model = llama(2, 64, device="cuda")
    ids = random_ids(600, batch=2, seed=1).cuda()
    with compress(model, press, cuda_graph=False):
        expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=300, min_new_tokens=300,
                                  do_sample=False)
    with compress(model, press):
        got = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=300, min_new_tokens=300,
                             do_sample=False)
    assert torch.equal(got, expected)  # float32; 300 tokens grow the tail past its first capacity
