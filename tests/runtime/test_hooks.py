"""The runtime on tiny random-weight models of every supported architecture, for every press."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import transformers

import curdkv
from curdkv import CompressedCache, CompressedLayer, Press, ScoringView
from curdkv.attention.recording import _recorders
from curdkv.attention.function import using_curdkv_attention
from curdkv.selection import select_uniform

from conftest import DTYPES, random_ids
from curdkv.transformers_compat import cache_keyword, forward_with_cache
from helpers import stored_lengths

# Uniform presses; head-adaptive ones are tested in test_adaptive.py.
# Uniform presses: every layer and head keeps the same count (LAVa and PyramidKV set
# layer budgets; their own tests check them).
# KVzip also sets layer budgets, and reads a tokenizer for its prompt: tests/presses/test_kvzip.py runs it.
PRESS_NAMES = sorted(name for name in curdkv.PRESSES
                     if not name.startswith(("ada", "kvzip")) and name not in ("lava", "pyramidkv"))
N = 200  # context length: > SnapKV's window of 64 at every ratio used here
RATIO = 0.5


def make_press(name: str, ratio: float = RATIO) -> Press:
    return curdkv.get_press(name, ratio)


def assert_no_hooks(model, attn_impl: str = "sdpa") -> None:
    for layer in model.model.layers:
        assert len(layer.self_attn._forward_hooks) == 0, "forward hook left on an attention module"
        assert len(layer.self_attn._forward_pre_hooks) == 0
    assert len(model._forward_pre_hooks) == 0, "forward pre-hook left on the model"
    assert len(model._forward_hooks) == 0
    assert model.config._attn_implementation == attn_impl
    assert not _recorders, "query recorders left registered"


def layer_states(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def eos_ids(model) -> set[int]:
    eos = model.generation_config.eos_token_id
    if eos is None:
        return set()
    return {eos} if isinstance(eos, int) else set(eos)


def assert_same_generation(model, generated: list[int], reference: list[int]) -> None:
    """``generate`` stops at EOS; the reference loop does not, so compare up to where ``generate`` stopped."""
    assert len(generated) >= 1
    assert generated == reference[: len(generated)]
    if len(generated) < len(reference):
        assert generated[-1] in eos_ids(model)


# --------------------------------------------------------------------------- 1. sweep path == layer-by-layer path


@pytest.mark.parametrize("press_name", PRESS_NAMES)
def test_sweep_path_keeps_same_tokens_as_layer_by_layer(model, press_name):
    press = make_press(press_name)
    ids = random_ids(N)
    cap = curdkv.capture_prefill(model, ids, query_window=press.query_window)
    cache_a = cap.build_cache(press)

    cache_b = CompressedCache()
    with curdkv.compress(model, press):
        forward_with_cache(model, cache_b, input_ids=ids, use_cache=True)

    assert len(cache_a.layers) == len(cache_b.layers) == model.config.num_hidden_layers
    kept = N - int(N * RATIO)
    for (ka, va), (kb, vb) in zip(layer_states(cache_a), layer_states(cache_b)):
        assert ka.shape[2] == kept
        assert torch.equal(ka, kb)
        assert torch.equal(va, vb)
    for la, lb in zip(cache_a.layers, cache_b.layers):
        assert isinstance(lb, CompressedLayer)
        assert la.evicted == lb.evicted == N - kept


# --------------------------------------------------------------------------- 2. kept count per head and bytes


@pytest.mark.parametrize("n, ratio", [(200, 0.5), (257, 0.3), (180, 0.25)])
@pytest.mark.parametrize("press_name", PRESS_NAMES)
def test_kept_count_logical_length_and_nbytes(model, press_name, n, ratio):
    ids = random_ids(n, seed=1)
    press = make_press(press_name, ratio)
    cache = CompressedCache()
    with curdkv.compress(model, press):
        forward_with_cache(model, cache, input_ids=ids, use_cache=True)

    full = CompressedCache()
    forward_with_cache(model, full, input_ids=ids, use_cache=True)

    cfg = model.config
    kept = n - int(n * ratio)
    assert kept < n
    for layer in cache.layers:
        assert tuple(layer.keys.shape) == (1, cfg.num_key_value_heads, kept, cfg.head_dim)
        assert tuple(layer.values.shape) == (1, cfg.num_key_value_heads, kept, cfg.head_dim)
        assert layer.stored_length == kept
        assert layer.get_seq_length() == n  # logical length: RoPE positions continue after the context
    assert cache.get_seq_length() == n
    assert stored_lengths(cache) == [kept] * cfg.num_hidden_layers
    assert stored_lengths(full) == [n] * cfg.num_hidden_layers
    assert full.nbytes() > 0
    assert cache.nbytes() * n == full.nbytes() * kept
    assert curdkv.cache_nbytes(cache) == cache.nbytes()


# --------------------------------------------------------------------------- 3. ratio 0 is a no-op


@pytest.mark.parametrize("press_name", PRESS_NAMES)
def test_ratio_zero_changes_nothing(model, press_name):
    ids = random_ids(150, seed=2)
    press = make_press(press_name).with_ratio(0.0)
    assert press.compression_ratio == 0.0
    assert type(press) is type(make_press(press_name))

    reference = model(input_ids=ids).logits
    with curdkv.compress(model, press):
        logits = model(input_ids=ids).logits
        cache = CompressedCache()
        forward_with_cache(model, cache, input_ids=ids, use_cache=True)
    assert torch.allclose(logits, reference, atol=1e-6, rtol=0)
    assert stored_lengths(cache) == [150] * model.config.num_hidden_layers

    gen_ref = model.generate(ids, max_new_tokens=8, do_sample=False)
    with curdkv.compress(model, press):
        gen = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(gen, gen_ref)
    assert_no_hooks(model)


def test_build_cache_none_is_full_cache(model):
    ids = random_ids(150, seed=2)
    cap = curdkv.capture_prefill(model, ids)
    full = cap.build_cache(None)
    zero = cap.build_cache(curdkv.CurDKVPress(compression_ratio=0.0))
    assert stored_lengths(full) == stored_lengths(zero) == [150] * model.config.num_hidden_layers
    assert full.nbytes() == cap.nbytes()
    for (kf, vf), (kz, vz) in zip(layer_states(full), layer_states(zero)):
        assert torch.equal(kf, kz) and torch.equal(vf, vz)


# --------------------------------------------------------------------------- 4. generation == hand-gathered cache


def gather_by_hand(states: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    b = torch.arange(states.shape[0])[:, None, None]
    h = torch.arange(states.shape[1])[None, :, None]
    return states[b, h, indices]  # [B, H_kv, k, D]


def hand_compressed_cache(model, press: Press, ids: torch.Tensor) -> CompressedCache:
    n = ids.shape[1]
    n_keep = n - int(n * press.compression_ratio)
    cap = curdkv.capture_prefill(model, ids, query_window=press.query_window)
    layers = []
    for idx, decoder_layer in enumerate(model.model.layers):
        keys, values = cap.keys[idx], cap.values[idx]
        queries = cap.queries[idx][:, :, -press.query_window :] if press.query_window else None
        scores = press.score(ScoringView(keys, values, queries, decoder_layer.self_attn, idx))
        assert scores.dtype == torch.float32
        assert tuple(scores.shape) == tuple(keys.shape[:3])
        indices = select_uniform(scores, n_keep, press.protected_sinks, press.protected_recent)
        # protected tokens really are kept
        if press.protected_sinks:
            assert (indices[..., : press.protected_sinks] == torch.arange(press.protected_sinks)).all()
        if press.protected_recent:
            assert (indices[..., -press.protected_recent :] == torch.arange(n - press.protected_recent, n)).all()
        k, v = gather_by_hand(keys, indices), gather_by_hand(values, indices)
        layers.append(CompressedLayer.from_states(k, v, n - n_keep))
    return CompressedCache.from_layers(layers)


def greedy_by_hand(model, ids: torch.Tensor, cache: CompressedCache, steps: int) -> list[int]:
    n = ids.shape[1]
    token = model(input_ids=ids).logits[:, -1].argmax(-1)  # full prefill: compression happens after attention
    tokens = [int(token)]
    with using_curdkv_attention(model):
        for step in range(steps - 1):
            out = forward_with_cache(model, cache, input_ids=token[:, None], use_cache=True,
                position_ids=torch.tensor([[n + step]]))
            token = out.logits[:, -1].argmax(-1)
            tokens.append(int(token))
    assert cache.get_seq_length() == n + steps - 1
    return tokens


# Lookahead Q-Cache scores with pseudo queries the hand path does not decode (its own tests check them).
@pytest.mark.parametrize("press_name", [p for p in PRESS_NAMES if p != "lookahead"])
def test_generation_equals_hand_gathered_cache(model, press_name):
    press = make_press(press_name)
    ids = random_ids(220, seed=3)
    cache = hand_compressed_cache(model, press, ids)
    assert stored_lengths(cache) == [110] * model.config.num_hidden_layers
    reference = greedy_by_hand(model, ids, cache, steps=8)
    assert stored_lengths(cache) == [110 + 7] * model.config.num_hidden_layers

    with curdkv.compress(model, press):
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(out[:, :220], ids)
    assert_same_generation(model, out[0, 220:].tolist(), reference)


def test_compression_changes_generation_somewhere(model):
    """Guard for test 4: on random weights, keeping few tokens must change some continuation."""
    ids = random_ids(220, seed=3)
    full = model.generate(ids, max_new_tokens=8, do_sample=False)
    differs = False
    for name in ("streamingllm", "knorm", "random"):
        with curdkv.compress(model, make_press(name, 0.9)):
            out = model.generate(ids, max_new_tokens=8, do_sample=False)
        differs |= not torch.equal(out, full)
    assert differs


# --------------------------------------------------------------------------- 5. batches


def _compress_batch(model, press, ids) -> CompressedCache:
    cache = CompressedCache()
    with curdkv.compress(model, press):
        forward_with_cache(model, cache, input_ids=ids, use_cache=True)
    return cache


@pytest.mark.parametrize(
    "press_name",
    PRESS_NAMES,
)
def test_batch_equals_each_alone(model, press_name):
    press = make_press(press_name)
    ids = torch.cat([random_ids(200, seed=4), random_ids(200, seed=5)])
    batched = _compress_batch(model, press, ids)
    alone = [_compress_batch(model, press, ids[i : i + 1]) for i in range(2)]
    for idx, layer in enumerate(batched.layers):
        assert tuple(layer.keys.shape[:3]) == (2, model.config.num_key_value_heads, 100)
        for b in range(2):
            assert torch.allclose(layer.keys[b : b + 1], alone[b].layers[idx].keys, atol=1e-5, rtol=1e-5)
            assert torch.allclose(layer.values[b : b + 1], alone[b].layers[idx].values, atol=1e-5, rtol=1e-5)
    # the two contexts are different, so what is kept is too
    assert not torch.allclose(batched.layers[0].keys[0], batched.layers[0].keys[1])

    with curdkv.compress(model, press):
        out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape == (2, 204)


# --------------------------------------------------------------------------- 6. dtypes


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("press_name", PRESS_NAMES)
def test_dtypes_compress_and_generate(arch, tiny_models, press_name, dtype_name):
    dtype = DTYPES[dtype_name]
    model = tiny_models(arch, dtype)
    assert model.dtype == dtype
    press = make_press(press_name)
    ids = random_ids(160, seed=6)

    cap = curdkv.capture_prefill(model, ids, query_window=press.query_window)
    scores = cap.scores(press, cap.window_queries(press))[0]
    assert scores.dtype == torch.float32
    assert not torch.isnan(scores).any()

    cache = CompressedCache()
    with curdkv.compress(model, press):
        out = model.generate(
            ids, **{cache_keyword(model): cache}, max_new_tokens=4, do_sample=False,
            output_logits=True, return_dict_in_generate=True)
    assert out.sequences.shape[1] > 160
    for logits in out.logits:
        assert not torch.isnan(logits).any()
    steps = out.sequences.shape[1] - 160
    assert stored_lengths(cache)[0] == 80 + steps - 1
    assert cache.layers[0].keys.dtype == dtype
    assert_no_hooks(model)


# --------------------------------------------------------------------------- 7. hooks are removed


class _Boom(Exception):
    pass


@dataclasses.dataclass
class FailingPress(Press):
    def score(self, view):
        raise _Boom("score failed")


@pytest.mark.parametrize("press_name", ["curdkv", "snapkv"])
def test_hooks_removed_after_block(model, press_name):
    assert_no_hooks(model)
    press = make_press(press_name)
    with curdkv.compress(model, press):
        assert model.config._attn_implementation == "curdkv"
        assert all(len(layer.self_attn._forward_hooks) == 1 for layer in model.model.layers)
        assert len(model._forward_pre_hooks) == 1
        model(input_ids=random_ids(200))
    assert_no_hooks(model)


def test_hooks_removed_after_exception_in_block(model):
    with pytest.raises(_Boom):
        with curdkv.compress(model, curdkv.SnapKVPress(compression_ratio=0.5)):
            model(input_ids=random_ids(200))
            raise _Boom("user code failed")
    assert_no_hooks(model)


def test_exception_in_score_propagates_and_leaves_no_hooks(model):
    cache = CompressedCache()
    with pytest.raises(_Boom, match="score failed"):
        with curdkv.compress(model, FailingPress(compression_ratio=0.5)):
            forward_with_cache(model, cache, input_ids=random_ids(100), use_cache=True)
    assert_no_hooks(model)
    # the model still works normally afterwards
    reference = model(input_ids=random_ids(50)).logits
    assert not torch.isnan(reference).any()


def test_hooks_restored_with_previous_attention():
    model, _ = curdkv.load_model("random:tiny-llama", dtype=torch.float32, device="cpu", attn_implementation="eager")
    assert model.config._attn_implementation == "eager"
    with pytest.raises(_Boom):
        with curdkv.compress(model, curdkv.KNormPress(compression_ratio=0.5)):
            raise _Boom()
    assert_no_hooks(model, attn_impl="eager")


# --------------------------------------------------------------------------- 8. bad input


def test_context_shorter_than_window_raises(model):
    ids = random_ids(30)
    with pytest.raises(ValueError, match=r"64"):
        with curdkv.compress(model, curdkv.SnapKVPress(compression_ratio=0.5)):
            forward_with_cache(model, CompressedCache(), input_ids=ids, use_cache=True)
    assert_no_hooks(model)
    with pytest.raises(ValueError, match=r"64"):
        curdkv.capture_prefill(model, ids).build_cache(curdkv.SnapKVPress(compression_ratio=0.5))


def test_budget_smaller_than_sinks_raises(model):
    ids = random_ids(30)
    cap = curdkv.capture_prefill(model, ids)
    with pytest.raises(ValueError, match=r"budget|protect"):
        cap.build_cache(curdkv.StreamingLLMPress(compression_ratio=0.9))  # keeps 3 < 4 sinks
    with pytest.raises(ValueError, match=r"fewer than the 4"):
        curdkv.capture_prefill(model, random_ids(3)).build_cache(curdkv.CurDKVPress(compression_ratio=0.5))


def test_padded_attention_mask_raises(model):
    ids = random_ids(100, batch=2)
    mask = torch.ones_like(ids)
    mask[1, :10] = 0
    with pytest.raises(ValueError, match="padding"):
        with curdkv.compress(model, curdkv.CurDKVPress(compression_ratio=0.5)):
            forward_with_cache(model, CompressedCache(), input_ids=ids, attention_mask=mask, use_cache=True)
    assert_no_hooks(model)
    # an all-ones mask is fine
    with curdkv.compress(model, curdkv.CurDKVPress(compression_ratio=0.5)):
        model(input_ids=ids, attention_mask=torch.ones_like(ids))


def test_unsupported_architecture_raises():
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=100)
    gpt2 = transformers.GPT2LMHeadModel(config).eval()
    with pytest.raises(ValueError, match="unsupported architecture 'gpt2'"):
        with curdkv.compress(gpt2, curdkv.CurDKVPress(compression_ratio=0.5)):
            pass
    with pytest.raises(ValueError, match="unsupported architecture"):
        curdkv.capture_prefill(gpt2, torch.zeros(1, 10, dtype=torch.long))
    assert len(gpt2._forward_pre_hooks) == 0


def test_sliding_window_model_raises():
    config = curdkv.models.random_config("tiny-mistral", sliding_window=64)
    mistral = transformers.AutoModelForCausalLM.from_config(config).eval()
    with pytest.raises(ValueError, match="sliding-window"):
        with curdkv.compress(mistral, curdkv.CurDKVPress(compression_ratio=0.5)):
            pass


def test_unknown_models_raise():
    with pytest.raises(ValueError, match="name must be one of"):
        curdkv.load_model("no-such-model")
    with pytest.raises(ValueError, match="random architecture must be one of"):
        curdkv.load_model("random:nope")


def test_press_not_a_press_raises(model):
    with pytest.raises(TypeError, match="press must be a curdkv Press"):
        with curdkv.compress(model, "snapkv"):
            pass
    with pytest.raises(TypeError, match="press must be a curdkv Press"):
        curdkv.capture_prefill(model, random_ids(100)).build_cache("snapkv")
    assert_no_hooks(model)


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, float("nan"), True])
def test_bad_ratio_raises(ratio):
    with pytest.raises(ValueError, match="compression_ratio"):
        curdkv.CurDKVPress(compression_ratio=ratio)


def test_bad_capture_input_raises(model):
    with pytest.raises(ValueError, match="input_ids"):
        curdkv.capture_prefill(model, random_ids(100)[0])
    with pytest.raises(ValueError, match="empty"):
        curdkv.capture_prefill(model, torch.zeros(1, 0, dtype=torch.long))


# --------------------------------------------------------------------------- 9. the attention function


@pytest.mark.parametrize("press_name", ["curdkv", "snapkv", "streamingllm"])
def test_multi_token_append_equals_one_at_a_time(model, press_name):
    ids = random_ids(200, seed=7)
    question = random_ids(6, seed=8)
    cap = curdkv.capture_prefill(model, ids)
    press = make_press(press_name)
    positions = torch.arange(200, 206)[None]

    with using_curdkv_attention(model):
        cache = cap.build_cache(press)
        together = forward_with_cache(model, cache, input_ids=question, position_ids=positions, use_cache=True).logits

        cache = cap.build_cache(press)
        one_by_one = torch.cat(
            [
                forward_with_cache(model, cache, input_ids=question[:, i : i + 1], position_ids=positions[:, i : i + 1],
                    use_cache=True).logits
                for i in range(6)
            ],
            dim=1,
        )
    assert stored_lengths(cache) == [106] * model.config.num_hidden_layers
    assert cache.get_seq_length() == 206
    assert torch.allclose(together, one_by_one, atol=1e-5, rtol=1e-5)


def test_append_to_full_cache_equals_one_forward(model):
    """With nothing evicted, appending a question to the cache equals running context + question at once."""
    ids = random_ids(200, seed=7)
    question = random_ids(6, seed=8)
    cap = curdkv.capture_prefill(model, ids)
    reference = model(input_ids=torch.cat([ids, question], dim=1)).logits[:, -6:]
    with using_curdkv_attention(model):
        cache = cap.build_cache(None)
        logits = forward_with_cache(model, cache, input_ids=question, position_ids=torch.arange(200, 206)[None], use_cache=True).logits
    assert torch.allclose(logits, reference, atol=1e-5, rtol=1e-5)


def test_recorded_queries_do_not_pin_the_prefill_queries(model):
    cap = curdkv.capture_prefill(model, random_ids(200), query_window=16)
    for q in cap.queries:
        assert q.shape[2] == 16
        assert q.untyped_storage().nbytes() == q.numel() * q.element_size(), "a view would hold every query"


@pytest.mark.parametrize("spec", ["curdkv:layer_budget=context_attention:leverage_floor=0.25", "lava"])
def test_whole_prefill_presses_score_each_layer_after_its_attention(model, spec, monkeypatch):
    # A press that reads every context query and sets budgets over all layers is scored right after
    # each layer's attention, so no layer's queries are held while another layer runs.
    import curdkv.runtime.hooks as hooks

    press = curdkv.get_press(spec, 0.6)
    events, real = [], hooks.layer_scores

    def spy(press_, keys, values, queries, module, idx, *args, **kwargs):
        held = [i for rec in _recorders.values() for i in rec.queries]
        events.append((idx, queries.shape[2], held))
        return real(press_, keys, values, queries, module, idx, *args, **kwargs)

    monkeypatch.setattr(hooks, "layer_scores", spy)
    ids = random_ids(N)
    cache = CompressedCache()
    with curdkv.compress(model, press):
        forward_with_cache(model, cache, input_ids=ids, use_cache=True)
    layers = model.config.num_hidden_layers
    assert events == [(i, min(press.query_window, N), []) for i in range(layers)]
    reference = curdkv.capture_prefill(model, ids, query_window=press.query_window).build_cache(press)
    for a, b in zip(reference.layers, cache.layers):
        assert type(a) is type(b)
        held = ("context_keys", "context_values", "lengths") if hasattr(a, "context_keys") else ("keys", "values")
        assert all(torch.equal(getattr(a, name), getattr(b, name)) for name in held)
        assert getattr(b, held[0]).numel() > 0
    scored = curdkv.runtime.capture.PrefillCapture([None] * layers, [None] * layers, [None] * layers, None, N,
                                                   scored=(press, [None] * layers))
    with pytest.raises(ValueError, match="holds the scores of .* alone"):
        scored.build_cache(press.with_ratio(0.5))
