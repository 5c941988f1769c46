"""The ragged cache of head-adaptive presses, and generation over it."""

from __future__ import annotations

import pytest
import torch

import curdkv
from curdkv import AdaCurDKVPress, AdaSnapKVPress, CurDKVPress, MaskedLayer, RaggedLayer
from curdkv.presses import SnapKVPress
from curdkv.runtime.layer import compress_layer

from conftest import DTYPES, random_ids
from helpers import CACHED_STATES, greedy
from curdkv.transformers_compat import forward_with_cache

ADAPTIVE = ("adacurdkv", "adasnapkv", "adacurdkv-sketch")


def _layer_from_random(b=2, h=4, n=50, d=16, ratio=0.6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(b, h, n, d, generator=gen) * torch.logspace(-1, 1, h)[None, :, None, None]
    values = torch.randn(b, h, n, d, generator=gen)
    layer = compress_layer(AdaCurDKVPress(ratio, estimator="exact", **CACHED_STATES), keys, values, None, None, 0)
    return keys, values, layer


def test_ragged_layer_holds_exactly_the_kept_tokens():
    keys, values, layer = _layer_from_random()
    assert isinstance(layer, RaggedLayer)
    b, h, n, d = keys.shape
    n_keep = n - int(n * 0.6)
    assert layer.lengths.sum() == b * h * n_keep
    assert layer.get_seq_length() == n, "the logical length stays the original context's"
    kept_bytes = 2 * b * h * n_keep * d * keys.element_size()
    assert layer.nbytes() == kept_bytes + layer.offsets.numel() * 8
    # Rows of each head are that head's kept tokens, in context order.
    offsets = layer.offsets.tolist()
    for bi in range(b):
        for hi in range(h):
            seg = layer.context_keys[offsets[bi * h + hi] : offsets[bi * h + hi + 1]]
            matches = (seg[:, None, :] == keys[bi, hi][None]).all(-1).nonzero()[:, 1]
            assert matches.tolist() == sorted(matches.tolist()) and len(matches) == len(seg)


def test_ragged_tail_appends_snapshots_and_restores():
    keys, values, layer = _layer_from_random()
    b, h, n, d = keys.shape
    state = layer.snapshot()
    new = [torch.randn(b, h, q, d) for q in (3, 1, 70)]
    for t in new:
        kv, same = layer.update(t, t + 1)
        assert kv is same and kv.tail_keys.shape[2] == layer.tail_length
    assert layer.get_seq_length() == n + 74
    assert torch.equal(layer.keys, torch.cat(new, dim=2)) and torch.equal(layer.values, torch.cat(new, 2) + 1)
    assert layer._tail_k.shape[2] >= 74
    bare = layer.nbytes()
    layer.restore(state)
    assert layer.get_seq_length() == n and layer.keys.shape[2] == 0
    assert layer.nbytes() < bare, "restoring to the bare context gives the tail buffer back"
    layer.update(new[1], new[1])
    assert torch.equal(layer.keys, new[1])
    layer.crop(-1)
    assert layer.get_seq_length() == n
    with pytest.raises(ValueError, match="appended after compression"):
        layer.crop(-1)


def test_ragged_layer_refuses_a_head_without_tokens():
    keys = torch.randn(1, 2, 5, 4)
    keep = torch.ones(1, 2, 5, dtype=torch.bool)
    keep[0, 1] = False
    with pytest.raises(ValueError, match="at least one token"):
        RaggedLayer.from_mask(keys, keys, keep)


@pytest.mark.parametrize("press_name", ADAPTIVE)
def test_ragged_generation_equals_masked_reference(model, press_name):
    press = curdkv.get_press(press_name, 0.5)
    ids = random_ids(200, seed=7)
    capture = curdkv.capture_prefill(model, ids)
    ragged, masked = capture.build_cache(press), capture.build_cache(press, "masked")
    assert all(isinstance(layer, RaggedLayer) for layer in ragged.layers)
    assert all(isinstance(layer, MaskedLayer) for layer in masked.layers)
    assert greedy(model, ids, ragged, 10) == greedy(model, ids, masked, 10)
    # and the hook path (generate) keeps the same tokens as the sweep path
    with curdkv.compress(model, press):
        out = model.generate(ids, max_new_tokens=10, do_sample=False, min_new_tokens=10)
    assert [[t] for t in out[0, 200:].tolist()] == greedy(model, ids, capture.build_cache(press), 10)


@pytest.mark.parametrize("press_name", ADAPTIVE)
def test_sweep_path_keeps_same_tokens_as_layer_by_layer(model, press_name):
    press = curdkv.get_press(press_name, 0.7)
    ids = random_ids(260, seed=2)  # SnapKV keeps its 64-token window: needs 0.3 * N >= 64
    swept = curdkv.capture_prefill(model, ids).build_cache(press)
    hooked = curdkv.CompressedCache()
    with curdkv.compress(model, press):
        forward_with_cache(model, hooked, input_ids=ids, use_cache=True)
    for a, b in zip(swept.layers, hooked.layers):
        assert isinstance(b, RaggedLayer)
        assert torch.equal(a.lengths, b.lengths)
        assert torch.allclose(a.context_keys, b.context_keys, atol=1e-6)
        assert torch.allclose(a.context_values, b.context_values, atol=1e-6)


@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.9])
def test_ragged_bytes_match_uniform_and_masked_saves_nothing(model, ratio):
    ids = random_ids(200, seed=1)
    capture = curdkv.capture_prefill(model, ids)
    full = capture.build_cache(None).nbytes()
    uniform = capture.build_cache(CurDKVPress(ratio)).nbytes()
    ragged = capture.build_cache(AdaCurDKVPress(ratio))
    masked = capture.build_cache(AdaCurDKVPress(ratio), "masked").nbytes()
    assert abs(ragged.nbytes() - uniform) / uniform < 0.02
    assert masked >= full
    h = model.config.num_key_value_heads
    n_keep = 200 - int(200 * ratio)
    assert all(int(layer.lengths.sum()) == h * n_keep for layer in ragged.layers)


def test_ratio_zero_is_a_no_op(model):
    ids = random_ids(100, seed=3)
    capture = curdkv.capture_prefill(model, ids)
    cache = capture.build_cache(AdaCurDKVPress(0.0))
    for layer, k in zip(cache.layers, capture.keys):
        assert layer.keys is k


def test_batch_with_different_head_lengths_equals_each_alone(model):
    press = AdaCurDKVPress(0.5, estimator="exact")
    ids = torch.cat([random_ids(160, seed=4), random_ids(160, seed=5)])
    batched = curdkv.capture_prefill(model, ids).build_cache(press)
    alone = [curdkv.capture_prefill(model, ids[i : i + 1]).build_cache(press) for i in range(2)]
    for idx, layer in enumerate(batched.layers):
        h = layer.lengths.shape[1]
        for b in range(2):
            assert torch.equal(layer.lengths[b], alone[b].layers[idx].lengths[0])
            seg = layer.context_keys[int(layer.offsets[b * h]) : int(layer.offsets[(b + 1) * h])]
            assert torch.allclose(seg, alone[b].layers[idx].context_keys, atol=1e-5)
    assert not torch.equal(batched.layers[0].lengths[0], batched.layers[0].lengths[1])
    assert greedy(model, ids, batched, 6) == [
        [a[0], b[0]] for a, b in zip(*(greedy(model, ids[i : i + 1], alone[i], 6) for i in range(2)))
    ]


@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_dtypes_generate_without_nans(arch, tiny_models, dtype_name):
    model = tiny_models(arch, DTYPES[dtype_name])
    ids = random_ids(200, seed=6)
    with curdkv.compress(model, AdaSnapKVPress(0.6)):
        out = model.generate(ids, max_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True)
    assert out.sequences.shape[1] > 200
    assert all(torch.isfinite(logits).all() for logits in out.logits)


def test_layout_choice_reaches_generate(model):
    ids = random_ids(120, seed=8)
    cache = curdkv.CompressedCache()
    with curdkv.compress(model, AdaCurDKVPress(0.5), layout="masked"):
        forward_with_cache(model, cache, input_ids=ids, use_cache=True)
    assert all(isinstance(layer, MaskedLayer) for layer in cache.layers)
    with pytest.raises(ValueError, match="layout"):
        with curdkv.compress(model, AdaCurDKVPress(0.5), layout="paged"):
            pass
    # a uniform press may use the masked or ragged layouts too, keeping the same tokens
    capture = curdkv.capture_prefill(model, ids)
    dense = capture.build_cache(CurDKVPress(0.5))
    ragged = capture.build_cache(CurDKVPress(0.5), "ragged")
    assert greedy(model, ids, dense, 5) == greedy(model, ids, ragged, 5)
    assert isinstance(SnapKVPress(0.5), curdkv.Press)


def test_concatenated_configurations_decode_like_each_alone(model):
    """Several presses' caches of one prompt, stacked on the batch, decode as each does alone."""
    ids = random_ids(200, seed=9)
    capture = curdkv.capture_prefill(model, ids)
    dense = capture.build_cache(CurDKVPress(0.7))
    parts = [
        [RaggedLayer.from_dense(layer.keys, layer.values, 200) for layer in dense.layers],
        capture.build_cache(AdaCurDKVPress(0.5)).layers,
        capture.build_cache(AdaSnapKVPress(0.3)).layers,
    ]
    stacked = curdkv.CompressedCache.from_layers([RaggedLayer.concat(list(ls)) for ls in zip(*parts)])
    assert stacked.layers[0].lengths.shape[0] == 3
    batched = greedy(model, ids.expand(3, -1), stacked, 6)
    alone = [greedy(model, ids, curdkv.CompressedCache.from_layers(list(ls)), 6) for ls in parts]
    assert batched == [[a[0], b[0], c[0]] for a, b, c in zip(*alone)]
    assert greedy(model, ids, dense, 6) == alone[0], "a dense cache viewed as ragged decodes the same"
    with pytest.raises(ValueError, match="same length"):
        RaggedLayer.concat([capture.build_cache(AdaCurDKVPress(0.5)).layers[0], capture_short(model)])
    with pytest.raises(ValueError, match="nothing appended"):
        RaggedLayer.concat([parts[1][0], parts[1][0]])  # decoded above: its tail is not empty


def capture_short(model):
    return curdkv.capture_prefill(model, random_ids(150)).build_cache(AdaCurDKVPress(0.5)).layers[0]


def test_stack_caches_converts_dense_full_and_ragged():
    from curdkv.cache.stack import stack_caches

    model = curdkv.load_model("random:tiny-qwen2", dtype=torch.float32, device="cpu")[0]
    ids = random_ids(200, seed=10)
    capture = curdkv.capture_prefill(model, ids)
    caches = [capture.build_cache(None), capture.build_cache(CurDKVPress(0.5)), capture.build_cache(AdaCurDKVPress(0.9))]
    stacked = stack_caches(caches, 200)
    assert [int(x) for x in stacked.layers[0].lengths.sum(-1)] == [
        200 * model.config.num_key_value_heads, 100 * model.config.num_key_value_heads,
        20 * model.config.num_key_value_heads,
    ]
    assert stacked.get_seq_length() == 200
    with pytest.raises(ValueError, match="MaskedLayer"):
        stack_caches([capture.build_cache(AdaCurDKVPress(0.5), "masked")], 200)


def test_stack_caches_of_one_length_stay_dense_and_decode_as_each_alone():
    """Uniform presses at one ratio stack on the batch dimension; each row decodes as its cache alone."""
    from curdkv.cache.stack import stack_caches

    model = curdkv.load_model("random:tiny-llama", dtype=torch.float32, device="cpu")[0]
    capture = curdkv.capture_prefill(model, random_ids(200, seed=12))
    presses = [curdkv.get_press(name, 0.5) for name in ("curdkv", "snapkv", "knorm", "streamingllm")]
    caches = [capture.build_cache(p, "dense") for p in presses]
    stacked = stack_caches(caches, 200)
    assert all(type(layer) is curdkv.CompressedLayer and layer.keys.shape[0] == 4 for layer in stacked.layers)
    assert stacked.get_seq_length() == 200
    question = random_ids(5, seed=13)
    with curdkv.attention.function.using_curdkv_attention(model):
        together = _greedy_rows(model, stacked, question.expand(4, -1), 200)
        alone = torch.cat([_greedy_rows(model, c, question, 200) for c in caches])
    assert torch.equal(together, alone)


def _greedy_rows(model, cache, ids, position, steps=6):
    tokens = []
    for step in range(steps):
        positions = torch.arange(position, position + ids.shape[1])[None].expand(ids.shape[0], -1)
        logits = forward_with_cache(model, cache, input_ids=ids, position_ids=positions, use_cache=True).logits
        position += ids.shape[1]
        ids = logits[:, -1:].argmax(-1)
        tokens.append(ids)
    return torch.cat(tokens, dim=1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton ragged kernel runs on CUDA; run on the GPU machine")
@pytest.mark.parametrize("arch_name", ["tiny-llama", "tiny-qwen3"])
@pytest.mark.parametrize("press_name", ["adacurdkv", "adasnapkv"])
def test_triton_ragged_generation_equals_masked_reference_on_cuda(arch_name, press_name):
    model = curdkv.load_model(f"random:{arch_name}", dtype=torch.float32, device="cuda")[0]
    ids = random_ids(300, batch=2, seed=11).cuda()
    capture = curdkv.capture_prefill(model, ids)
    press = curdkv.get_press(press_name, 0.6)
    ragged, masked = capture.build_cache(press), capture.build_cache(press, "masked")
    assert ragged.layers[0].context_keys.is_cuda
    assert greedy(model, ids, ragged, 12) == greedy(model, ids, masked, 12)
