"""Compactor against slow, obvious references written here, and through the runtime.

The references work in float64, head by head and chunk by chunk, with SVDs
and explicit softmaxes; they share no code with the library.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import DynamicCache

import curdkv
from curdkv.cache.dense import CompressedCache
from curdkv.presses import AdaKVPress, ScoringView
from curdkv.presses import compactor as compactor_module
from curdkv.presses.base import ALL_QUERIES
from curdkv.presses.calibration import CalibrationCurve, calibrated_ratio, fit_calibration
from curdkv.runtime.nll import context_nll, context_nll_from_hidden
from curdkv.eval.calibration import nll_ratio
from curdkv.presses.compactor import (
    CompactorPress,
    approximate_leverage,
    non_causal_chunked_attention,
    zscore,
)

from conftest import TINY_ARCHS, random_ids, tiny_model
from helpers import attention_module, rotate
from curdkv.transformers_compat import cache_keyword, forward_with_cache



pytestmark = pytest.mark.usefixtures("one_thread")


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


# --------------------------------------------------------------------------- approximate leverage


def ref_leverage(x: torch.Tensor) -> torch.Tensor:
    """Leverage of each row of ``x`` ``[N, m]`` (float64): squared row norms of U in x = U S Vt, rank-truncated."""
    u, s, _ = torch.linalg.svd(x, full_matrices=False)
    keep = s > s.max() * 1e-9
    return u[:, keep].square().sum(-1)


def centred(keys: torch.Tensor) -> torch.Tensor:
    k = keys.double()
    return k - k.mean(0)


def heavy_tailed_keys(n: int, d: int, seed: int) -> torch.Tensor:
    """Rows of very different norms and columns of different scales, like real pre-RoPE keys."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randn(n, d, generator=gen) * (0.2 + 3 * torch.rand(n, 1, generator=gen))
    return rows @ torch.diag(torch.logspace(0, 1, d)) + torch.randn(d, generator=gen)


@pytest.mark.parametrize("n, d, k", [(60, 16, 5), (200, 32, 12), (150, 64, 48)])
def test_leverage_is_that_of_the_sketched_centred_keys(n, d, k):
    keys = heavy_tailed_keys(n, d, seed=n)
    phi = torch.randn(d, k, generator=torch.Generator().manual_seed(k)) / math.sqrt(k)
    got = approximate_leverage(keys[None, None], phi)[0, 0]
    assert got.dtype == torch.float32
    ref = ref_leverage(centred(keys) @ phi.double())
    # The relative ridge (1e-6) moves rows along the weakest sketched directions by up to
    # ~1e-6 * cond(XᵀX): 2e-4 relative at the 48-wide case's condition number.
    torch.testing.assert_close(got.double(), ref, rtol=1e-3, atol=1e-5)
    assert abs(float(got.sum()) - k) < 0.01  # leverages sum to the rank (less a hair for the ridge)


def test_wide_sketch_gives_the_exact_leverage_of_the_centred_keys():
    keys = heavy_tailed_keys(120, 16, seed=5)
    press = CompactorPress(sketch_dim=48)
    got = approximate_leverage(keys[None, None], press.sketch(16, "cpu"))[0, 0]
    torch.testing.assert_close(got.double(), ref_leverage(centred(keys)), rtol=1e-4, atol=1e-6)


def test_sketch_ranks_like_the_exact_leverage():
    """Sketch narrower than the head (48 < 64): the ranking stays close; exactly so on low-rank keys."""
    keys = heavy_tailed_keys(400, 64, seed=6)
    phi = CompactorPress(sketch_dim=48, seed=3).sketch(64, "cpu")
    got = approximate_leverage(keys[None, None], phi)[0, 0]
    exact = ref_leverage(centred(keys))
    assert spearman(got, exact) > 0.97
    top = set(got.topk(40).indices.tolist()) & set(exact.topk(40).indices.tolist())
    assert len(top) >= 28
    gen = torch.Generator().manual_seed(7)
    low_rank = torch.randn(400, 12, generator=gen, dtype=torch.float64) @ torch.randn(12, 64, generator=gen).double()
    got = approximate_leverage(low_rank.float()[None, None], phi)[0, 0]
    torch.testing.assert_close(got.double(), ref_leverage(centred(low_rank)), rtol=0, atol=1e-4)


# --------------------------------------------------------------------------- non-causal chunked attention


def ref_chunked_attention(q, k, chunk, scaling=1.0):
    """Loop over chunks, KV heads and query heads with an explicit softmax per query, float64."""
    b_, h, n, _ = q.shape
    h_kv = k.shape[1]
    group = h // h_kv
    out = torch.zeros(b_, h_kv, n, dtype=torch.float64)
    for b in range(b_):
        for kv in range(h_kv):
            for start in range(0, n, chunk):
                keys = k[b, kv, start : start + chunk].double()
                for qh in range(kv * group, (kv + 1) * group):
                    for i in range(start, min(start + chunk, n)):
                        logits = scaling * (keys @ q[b, qh, i].double())
                        p = logits.exp() / logits.exp().sum()
                        out[b, kv, start : start + len(p)] += p / group
    return out


@pytest.mark.parametrize("n, chunk, scaling", [(37, 8, 1.0), (32, 8, 0.25), (20, 64, 1.0), (9, 1, 1.0)])
def test_chunked_attention_matches_a_loop_over_chunks(n, chunk, scaling):
    gen = torch.Generator().manual_seed(n)
    q, k = torch.randn(2, 4, n, 16, generator=gen) * 0.5, torch.randn(2, 2, n, 16, generator=gen) * 0.5
    got = non_causal_chunked_attention(q, k, chunk, scaling)
    assert got.dtype == torch.float32
    ref = ref_chunked_attention(q, k, chunk, scaling)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)
    # Every query spreads a mass of 1 over its chunk: a chunk's scores sum to its length.
    torch.testing.assert_close(got.sum(-1), torch.full((2, 2), float(n)), rtol=1e-5, atol=0)


def test_chunked_attention_in_small_blocks_is_the_same(monkeypatch):
    gen = torch.Generator().manual_seed(8)
    q, k = torch.randn(1, 4, 45, 16, generator=gen), torch.randn(1, 2, 45, 16, generator=gen)
    whole = non_causal_chunked_attention(q, k, 4)
    monkeypatch.setattr(compactor_module, "ATTENTION_BLOCK_ELEMENTS", 2 * 4 * 4 * 4)  # two chunks per block
    torch.testing.assert_close(non_causal_chunked_attention(q, k, 4), whole, rtol=1e-6, atol=1e-7)


def test_chunked_attention_refuses_mismatched_heads_and_tokens():
    with pytest.raises(ValueError, match="cannot share"):
        non_causal_chunked_attention(torch.zeros(1, 3, 4, 8), torch.zeros(1, 2, 4, 8), 2)
    with pytest.raises(ValueError, match="same tokens"):
        non_causal_chunked_attention(torch.zeros(1, 2, 5, 8), torch.zeros(1, 2, 4, 8), 2)


# --------------------------------------------------------------------------- the blended score


def ref_pool(x: torch.Tensor, kernel: int) -> torch.Tensor:
    n, half = x.shape[-1], kernel // 2
    return torch.stack([x[..., max(0, j - half) : j + half + 1].mean(-1) for j in range(n)], dim=-1)


def ref_zscore(x: torch.Tensor, over: str) -> torch.Tensor:
    dims = (-1,) if over == "head" else (-2, -1)
    mean = x.mean(dim=dims, keepdim=True)
    return (x - mean) / (x - mean).square().mean(dim=dims, keepdim=True).sqrt()


def ref_compactor_scores(pre, post, values, queries, press, scaling):
    """The paper's blend, written out from the pre-RoPE keys the test rotated itself."""
    n = pre.shape[2]
    s, e = press.num_sinks, n - press.num_recent
    phi = (torch.randn(pre.shape[-1], press.sketch_dim, generator=torch.Generator().manual_seed(press.seed))
           / math.sqrt(press.sketch_dim)).double()
    b_, h_kv = pre.shape[:2]
    lev = torch.zeros(b_, h_kv, e - s, dtype=torch.float64)
    for b in range(b_):
        for h in range(h_kv):
            lev[b, h] = ref_leverage(centred(pre[b, h, s:e]) @ phi)
    scale = 1.0 if press.logit_scale == "unscaled" else scaling
    att = ref_chunked_attention(queries[:, :, s:e], post[:, :, s:e], press.chunk_size, scale)
    if press.value_weighting:
        att = att * values[:, :, s:e].double().norm(dim=-1)
    att = ref_pool(att, press.pool_kernel)
    blended = ref_zscore(att, press.normalization) + press.blending * ref_zscore(lev, press.normalization)
    top = blended.amax(-1, keepdim=True)
    return torch.cat([top.expand(-1, -1, s), blended, top.expand(-1, -1, n - e)], dim=-1)


@pytest.mark.parametrize(
    "options",
    [
        {},
        dict(value_weighting=False, pool_kernel=1),
        dict(normalization="layer", blending=1.0),
        dict(logit_scale="model", pool_kernel=5, blending=0.0),
        dict(num_sinks=0, num_recent=0, sketch_dim=20, chunk_size=7),
    ],
)
def test_scores_match_the_direct_blend(options):
    gen = torch.Generator().manual_seed(9)
    b, n = 2, 64
    pre = heavy_tailed_keys(b * 2 * n, 16, seed=10).reshape(b, 2, n, 16) * 0.3
    post = rotate(pre, "tiny-llama")
    values = torch.randn(b, 2, n, 16, generator=gen) * (0.5 + torch.rand(b, 2, n, 1, generator=gen))
    queries = torch.randn(b, 4, n, 16, generator=gen)
    kwargs = dict(compression_ratio=0.5, sketch_dim=8, chunk_size=16, num_sinks=3, num_recent=5, seed=1)
    press = CompactorPress(**{**kwargs, **options})
    module = attention_module("tiny-llama")
    view = ScoringView(keys=post, values=values, queries=queries, module=module, layer_idx=0)
    got = press.score(view)
    assert got.dtype == torch.float32 and got.shape == (b, 2, n)
    ref = ref_compactor_scores(pre, post, values, queries, press, float(module.scaling))
    torch.testing.assert_close(got.double(), ref, rtol=1e-3, atol=2e-3)


def test_scores_repeat_with_a_seed_and_change_with_another():
    gen = torch.Generator().manual_seed(11)
    pre = heavy_tailed_keys(2 * 80, 16, seed=12).reshape(1, 2, 80, 16) * 0.3
    view = ScoringView(keys=rotate(pre, "tiny-llama"), values=torch.randn(1, 2, 80, 16, generator=gen),
                       queries=torch.randn(1, 4, 80, 16, generator=gen), module=attention_module("tiny-llama"),
                       layer_idx=0)
    first = CompactorPress(0.5, sketch_dim=6, seed=4).score(view)
    assert torch.equal(first, CompactorPress(0.5, sketch_dim=6, seed=4).score(view))
    assert not torch.allclose(first, CompactorPress(0.5, sketch_dim=6, seed=5).score(view))


@pytest.mark.parametrize("case", ["constant pre-RoPE keys", "constant cached keys and values", "zero keys and values",
                                  "one token left"])
def test_degenerate_heads_give_finite_scores(case):
    n = 13 if case == "one token left" else 40
    keys = torch.randn(1, 2, n, 16, generator=torch.Generator().manual_seed(13))
    values = torch.randn(1, 2, n, 16, generator=torch.Generator().manual_seed(14))
    if case == "constant pre-RoPE keys":
        keys = rotate(keys[:, :, :1].expand(-1, -1, n, -1), "tiny-llama")
    elif case == "constant cached keys and values":
        keys[:, 0] = keys[:, 0, :1]
        values[:, 0] = values[:, 0, :1]
    elif case == "zero keys and values":
        keys[:, 1] = 0
        values[:, 1] = 0
    view = ScoringView(keys=keys.bfloat16(), values=values.bfloat16(), queries=torch.randn(1, 4, n, 16).bfloat16(),
                       module=attention_module("tiny-llama"), layer_idx=0)
    press = CompactorPress(0.5)
    scores = press.score(view)
    assert scores.dtype == torch.float32 and scores.shape == (1, 2, n)
    assert bool(torch.isfinite(scores).all())
    if case == "constant pre-RoPE keys":
        # Leverage is scale-free, so rounding noise around a constant key still ranks (finitely);
        # exactly constant keys centre to zero and have no leverage at all.
        assert float(approximate_leverage(torch.ones(1, 1, n, 16), torch.randn(16, 48)).abs().max()) == 0.0
    if case == "constant cached keys and values":  # uniform attention, equal values: nothing to tell apart
        spread = zscore(press.attention(view, 8, n - 4))[0, 0]
        assert float(spread.max() - spread.min()) < 1e-2
        assert float(scores[0, 1, 8 : n - 4].std()) > 0.1
    if case == "zero keys and values":
        assert float(scores[0, 1].abs().max()) == 0.0


def test_zscore_centres_and_scales_each_head_or_the_layer():
    x = torch.randn(2, 3, 50, generator=torch.Generator().manual_seed(15)) * torch.tensor([1.0, 5.0, 0.1])[:, None]
    per_head = zscore(x, "head")
    torch.testing.assert_close(per_head.mean(-1), torch.zeros(2, 3), rtol=0, atol=1e-5)
    torch.testing.assert_close(per_head.square().mean(-1), torch.ones(2, 3), rtol=1e-5, atol=0)
    per_layer = zscore(x, "layer")
    torch.testing.assert_close(per_layer.square().mean((-2, -1)), torch.ones(2), rtol=1e-5, atol=0)
    assert float(per_layer[:, 1].std()) > 10 * float(per_layer[:, 2].std())  # head scales survive


def test_press_asks_for_every_query_and_refuses_fewer():
    press = CompactorPress(0.5)
    assert press.query_window == ALL_QUERIES
    assert press.protected_sinks == 8 and press.protected_recent == 4
    assert press.scores_comparable_across_heads and press.name == "compactor"
    keys = torch.randn(1, 2, 30, 16)
    for queries in (None, torch.randn(1, 4, 20, 16)):
        view = ScoringView(keys=keys, values=keys, queries=queries, module=attention_module("tiny-llama"), layer_idx=0)
        with pytest.raises(ValueError, match="queries of all 30 context tokens"):
            press.score(view)
    view = ScoringView(keys=keys, values=keys, queries=torch.randn(1, 4, 30, 16), module=None, layer_idx=0)
    with pytest.raises(ValueError, match="attention module"):
        press.score(view)
    view = ScoringView(keys=keys, values=keys, queries=torch.randn(1, 4, 30, 16), module=attention_module("tiny-llama"),
                       layer_idx=0, positions=torch.arange(30).expand(1, 2, -1))
    with pytest.raises(ValueError, match="first prefill"):
        press.score(view)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(sketch_dim=0), "sketch_dim"),
        (dict(chunk_size=2.5), "chunk_size"),
        (dict(blending=-0.1), "blending"),
        (dict(blending=float("nan")), "blending"),
        (dict(blending=True), "blending"),
        (dict(num_sinks=-1), "num_sinks"),
        (dict(num_recent=None), "num_recent"),
        (dict(value_weighting=1), "value_weighting"),
        (dict(pool_kernel=4), "pool_kernel"),
        (dict(pool_kernel=0), "pool_kernel"),
        (dict(logit_scale="sqrt"), "logit_scale"),
        (dict(normalization="batch"), "normalization"),
        (dict(seed=-3), "seed"),
        (dict(calibration_alpha=1.0), "calibration_alpha and calibration_beta"),
        (dict(calibration_alpha=float("inf"), calibration_beta=0.0), "calibration_alpha"),
        (dict(compression_ratio=1.0), "compression_ratio"),
    ],
)
def test_bad_parameters_name_themselves(kwargs, name):
    with pytest.raises(ValueError, match=name):
        CompactorPress(**kwargs)


# --------------------------------------------------------------------------- through the runtime


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("n, ratio", [(200, 0.5), (157, 0.3)])
def test_compress_keeps_the_right_number_of_tokens(arch, n, ratio):
    model = tiny_model(arch)
    press = CompactorPress(ratio, chunk_size=64)
    ids = random_ids(n, seed=16)
    cache = CompressedCache()
    with curdkv.compress(model, press):
        forward_with_cache(model, cache, input_ids=ids, use_cache=True)
    kept = n - int(n * ratio)
    cfg = model.config
    for layer in cache.layers:
        assert tuple(layer.keys.shape) == (1, cfg.num_key_value_heads, kept, cfg.head_dim)
        assert layer.get_seq_length() == n
    # The sweep path (one captured prefill with every query) keeps the same tokens.
    capture = curdkv.capture_prefill(model, ids, query_window=ALL_QUERIES)
    for a, b in zip(capture.build_cache(press).layers, cache.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def test_head_adaptive_compactor_keeps_the_layer_budget():
    model = tiny_model("tiny-llama")
    ids = random_ids(180, seed=17)
    capture = curdkv.capture_prefill(model, ids, query_window=ALL_QUERIES)
    cache = capture.build_cache(AdaKVPress(CompactorPress(0.6, chunk_size=32)))
    kept = 180 - int(180 * 0.6)
    for layer in cache.layers:
        assert int(layer.lengths.sum()) == model.config.num_key_value_heads * kept


def test_compressed_generation_runs_and_protects_sinks_and_recent_tokens():
    model = tiny_model("tiny-qwen2")
    ids = random_ids(120, seed=18)
    press = CompactorPress(0.75, chunk_size=32)
    capture = curdkv.capture_prefill(model, ids, query_window=ALL_QUERIES)
    full = capture.keys[0]
    layer = capture.build_cache(press).layers[0]
    torch.testing.assert_close(layer.keys[:, :, :8], full[:, :, :8], rtol=0, atol=0)
    torch.testing.assert_close(layer.keys[:, :, -4:], full[:, :, -4:], rtol=0, atol=0)
    with curdkv.compress(model, press):
        out = model.generate(ids, max_new_tokens=4, do_sample=False, **{cache_keyword(model): CompressedCache()})
    assert out.shape == (1, 124)


# --------------------------------------------------------------------------- calibration


@pytest.mark.parametrize("alpha, beta, nll", [(2.0, -3.0, 4.0), (0.0, 1e-9, 3.0), (-1.0, 0.5, 2.0), (10.0, 40.0, 9.0)])
def test_curve_ends_and_closed_form_inverse(alpha, beta, nll):
    curve = CalibrationCurve(alpha, beta)
    assert curve.quality(0.0, nll) == pytest.approx(0.0, abs=1e-12)
    assert curve.quality(1.0, nll) == pytest.approx(1.0, abs=1e-12)
    b = curve.sharpness(nll)
    for r in (0.1, 0.5, 0.9):
        direct = r if abs(b) < 1e-8 else (math.exp(r * b - b) - math.exp(-b)) / (1 - math.exp(-b))
        assert curve.quality(r, nll) == pytest.approx(direct, rel=1e-6, abs=1e-9)
    for tolerance in (0.01, 0.05, 0.3, 0.9):
        r = curve.retention(nll, tolerance)
        assert 0.0 <= r <= 1.0
        assert curve.quality(r, nll) == pytest.approx(1 - tolerance, rel=1e-6, abs=1e-9)


def test_calibrated_ratio_grows_with_tolerance_and_stays_in_range():
    curve = CalibrationCurve(1.5, -2.0)
    for nll in (0.5, 2.0, 6.0):
        ratios = [calibrated_ratio(curve, nll, t) for t in (0.0, 0.001, 0.01, 0.05, 0.1, 0.3, 0.6, 0.9, 0.999999)]
        assert ratios[0] == 0.0
        assert all(0.0 <= r < 1.0 for r in ratios)
        assert all(a <= b for a, b in zip(ratios, ratios[1:]))
        assert ratios[-1] > ratios[1]
    # A batch is compressed at its most cautious element's ratio.
    batch = torch.tensor([0.5, 2.0, 6.0])
    assert calibrated_ratio(curve, batch, 0.05) == min(calibrated_ratio(curve, float(x), 0.05) for x in batch)


@pytest.mark.parametrize("tolerance", [-0.01, 1.0, 1.5, float("nan"), "0.05", True, None])
def test_bad_tolerance_names_the_allowed_range(tolerance):
    with pytest.raises(ValueError, match=r"tolerance must be a float in \[0, 1\)"):
        calibrated_ratio(CalibrationCurve(1.0, 0.0), 3.0, tolerance)


def test_calibrated_ratio_refuses_bad_curves_and_nlls():
    with pytest.raises(ValueError, match="CalibrationCurve"):
        calibrated_ratio((1.0, 0.0), 3.0, 0.05)
    with pytest.raises(ValueError, match="context_nll"):
        calibrated_ratio(CalibrationCurve(1.0, 0.0), float("nan"), 0.05)
    with pytest.raises(ValueError, match="alpha"):
        CalibrationCurve(float("inf"), 0.0)


def test_fit_recovers_a_known_curve_and_the_asymmetry_keeps_more_tokens():
    gen = torch.Generator().manual_seed(19)
    truth = CalibrationCurve(1.2, -1.5)
    r = torch.rand(300, generator=gen, dtype=torch.float64)
    nll = 1.0 + 4.0 * torch.rand(300, generator=gen, dtype=torch.float64)
    y = torch.tensor([truth.quality(float(a), float(c)) for a, c in zip(r, nll)], dtype=torch.float64)
    fitted = fit_calibration(r, nll, y, underestimate_weight=1.0)
    assert fitted.alpha == pytest.approx(truth.alpha, abs=1e-3)
    assert fitted.beta == pytest.approx(truth.beta, abs=1e-3)

    noisy = y + 0.05 * torch.randn(300, generator=gen, dtype=torch.float64)
    symmetric = fit_calibration(r, nll, noisy, underestimate_weight=1.0)
    cautious = fit_calibration(r, nll, noisy, underestimate_weight=8.0)

    def over(curve):  # how often the curve promises a better ratio than measured
        return sum(curve.quality(float(a), float(c)) > float(v) for a, c, v in zip(r, nll, noisy))

    assert over(cautious) < over(symmetric)
    assert calibrated_ratio(cautious, 3.0, 0.05) <= calibrated_ratio(symmetric, 3.0, 0.05)


@pytest.mark.parametrize(
    "args, kwargs, message",
    [
        (([0.5], [2.0], [0.9]), {}, "at least 2"),
        (([0.5, 0.6], [2.0], [0.9, 0.8]), {}, "equally long"),
        (([0.5, 1.5], [2.0, 2.0], [0.9, 0.8]), {}, r"retention must be in \[0, 1\]"),
        (([0.5, 0.6], [2.0, float("nan")], [0.9, 0.8]), {}, "context_nll"),
        (([0.5, 0.6], [2.0, 2.0], [0.9, 0.8]), dict(underestimate_weight=0.5), "underestimate_weight"),
    ],
)
def test_fit_refuses_bad_triples(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        fit_calibration(*args, **kwargs)


def test_context_nll_is_the_models_own_loss():
    model = tiny_model("tiny-llama")
    ids = random_ids(60, batch=2, seed=20)
    got = context_nll(model, ids)
    assert got.shape == (2,) and got.dtype == torch.float64
    for row in range(2):
        loss = model(input_ids=ids[row : row + 1], labels=ids[row : row + 1]).loss
        assert float(got[row]) == pytest.approx(float(loss), rel=1e-5)
    logits = model(input_ids=ids).logits.double().log_softmax(-1)
    ref = -torch.stack([logits[b, torch.arange(59), ids[b, 1:]].mean() for b in range(2)])
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=0)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        context_nll(model, ids[:, :1])


def test_context_nll_from_the_one_prefill_hidden_states():
    """A hook on the decoder during a cached prefill (logits of the last token only) gives the same NLL."""
    model = tiny_model("tiny-qwen3")
    ids = random_ids(80, batch=2, seed=25)
    seen = {}

    def keep_output(mod, args, kwargs, output):
        seen["hidden"] = output.last_hidden_state

    handle = model.get_decoder().register_forward_hook(keep_output, with_kwargs=True)
    try:
        forward_with_cache(model, DynamicCache(), input_ids=ids, use_cache=True, logits_to_keep=1)
    finally:
        handle.remove()
    got = context_nll_from_hidden(model, seen["hidden"], ids)
    torch.testing.assert_close(got, context_nll(model, ids), rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="hidden must be"):
        context_nll_from_hidden(model, seen["hidden"][:, 1:], ids)


def test_nll_ratio_is_one_without_compression_and_measured_with_it():
    model = tiny_model("tiny-llama")
    ids = random_ids(170, seed=21)
    context, query, answer = ids[:, :140], ids[:, 140:150], ids[:, 150:]
    assert nll_ratio(model, CompactorPress(0.0), context, answer, query) == 1.0
    measured = nll_ratio(model, CompactorPress(0.8, chunk_size=32), context, answer, query)
    assert math.isfinite(measured) and measured > 0 and measured != 1.0
    with pytest.raises(ValueError, match="answer_ids"):
        nll_ratio(model, CompactorPress(0.5), context, torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="press must be a curdkv Press"):
        nll_ratio(model, None, context, answer)


def test_press_calibrates_from_a_capture_on_a_tiny_model():
    """The paper's procedure end to end: measure triples, fit, then choose a ratio for new contexts."""
    model = tiny_model("tiny-llama")
    retentions, nlls, ratios = [], [], []
    for seed in (22, 23):
        ids = random_ids(150, seed=seed)
        nll = float(context_nll(model, ids[:, :130]))
        for keep in (0.25, 0.5, 0.75, 1.0):
            press = CompactorPress(1.0 - keep, chunk_size=32)
            retentions.append(keep)
            nlls.append(nll)
            ratios.append(nll_ratio(model, press, ids[:, :130], ids[:, 130:]))
    curve = fit_calibration(retentions, nlls, ratios)

    press = CompactorPress(0.0, calibration_alpha=curve.alpha, calibration_beta=curve.beta)
    assert press.calibrates and not CompactorPress(0.0).calibrates
    ids = random_ids(140, seed=24)
    nll = context_nll(model, ids)
    chosen = [press.calibrated_ratio(nll, t) for t in (0.001, 0.01, 0.05, 0.2, 0.5)]
    assert all(0.0 <= c < 1.0 for c in chosen)
    assert all(a <= b for a, b in zip(chosen, chosen[1:]))
    assert chosen == [calibrated_ratio(curve, nll, t) for t in (0.001, 0.01, 0.05, 0.2, 0.5)]
    # The runtime's capture keeps the ids and the model and measures the NLL: the same ratio from it.
    capture = curdkv.capture_prefill(model, ids, query_window=ALL_QUERIES)
    assert press.calibrated_ratio(capture.context_nll, 0.05) == chosen[2]
    # Without an NLL, the error says what is missing.
    with pytest.raises(ValueError, match="context_nll"):
        press.calibrated_ratio(None, 0.05)
    with pytest.raises(ValueError, match="fitted curve"):
        CompactorPress(0.0).calibrated_ratio(nll, 0.05)


def test_blending_none_weighs_leverage_by_the_compression_ratio():
    """kvpress's blend: the leverage weight is the compression ratio, so scores change with it (no reuse)."""
    gen = torch.Generator().manual_seed(9)
    view = ScoringView(keys=rotate(torch.randn(1, 2, 80, 16, generator=gen), "tiny-llama"),
                       values=torch.randn(1, 2, 80, 16, generator=gen), queries=torch.randn(1, 4, 80, 16, generator=gen),
                       module=attention_module("tiny-llama"), layer_idx=0)
    by_ratio = CompactorPress(0.7, blending=None)
    assert torch.equal(by_ratio.score(view), CompactorPress(0.7, blending=0.7).score(view))
    assert not torch.equal(by_ratio.score(view), CompactorPress(0.3, blending=None).score(view))
    assert by_ratio.scores_depend_on_ratio and not CompactorPress(0.7).scores_depend_on_ratio
