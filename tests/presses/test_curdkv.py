"""CurDKV (Algorithm 1 and the exact leverage) against slow, obvious references written inside the test.

The references use float64 torch ops per head; they share no code with the library.
"""

from __future__ import annotations

import math

import pytest
import torch

from curdkv.presses import CurDKVPress, ScoringView
from curdkv.selection import kept_count
from helpers import B, H_KV, CACHED_STATES as CACHED, close, compress_states, make_states, ref_topk_indices, view_of

# Small tensor ops single-threaded for the module (see conftest's one_thread): on a small
# shared CPU a 2-thread LAPACK call can stall waiting on a busy core.
pytestmark = pytest.mark.usefixtures("one_thread")


def ref_normalise(scores: torch.Tensor, local_window: int | None) -> torch.Tensor:
    """Scale a 1-D score vector to sum 1, or to sum 1 inside each window of tokens."""
    out = torch.empty_like(scores)
    n = len(scores)
    step = n if local_window is None else local_window
    for start in range(0, n, step):
        chunk = scores[start : start + step]
        out[start : start + step] = chunk / chunk.sum()
    return out


# --------------------------------------------------------------------------- CurDKV (Algorithm 1)


def ref_curdkv_scores(keys, values, *, seed, projection_dim, leverage, local_window):
    """Algorithm 1 of arXiv 2509.15038, head by head, in float64."""
    b_, h_, n, d = keys.shape
    if projection_dim is not None:
        gen = torch.Generator().manual_seed(seed)
        g_all = (torch.randn(h_, d, projection_dim, generator=gen) / math.sqrt(projection_dim)).double()
    out = torch.zeros(b_, h_, n, dtype=torch.float64)
    for b in range(b_):
        for h in range(h_):
            k = keys[b, h].double()
            v = values[b, h].double()
            if projection_dim is not None:
                g = g_all[h]
                lk = torch.stack([((k[j] @ g) ** 2).sum() for j in range(n)])
                lv = torch.stack([((v[j] @ g) ** 2).sum() for j in range(n)])
            else:
                lk = torch.stack([(k[j] ** 2).sum() for j in range(n)])
                lv = torch.stack([(v[j] ** 2).sum() for j in range(n)])
            if leverage == "kv_product":
                s = ref_normalise(lk * lv, local_window)
            elif leverage == "key":
                s = ref_normalise(lk, local_window)
            elif leverage == "value":
                s = ref_normalise(lv, local_window)
            elif leverage == "kv_avg":
                s = 0.5 * (ref_normalise(lk, local_window) + ref_normalise(lv, local_window))
            else:  # pragma: no cover
                raise AssertionError(leverage)
            out[b, h] = s
    return out


@pytest.mark.parametrize("n,d,r,seed", [(50, 16, 8, 0), (300, 64, 20, 7)])
def test_curdkv_projection_is_seeded_gaussian_sketch(n, d, r, seed):
    press = CurDKVPress(projection_dim=r, seed=seed)
    g = press.projection(H_KV, d, torch.device("cpu"))
    assert g.shape == (H_KV, d, r)
    expected = torch.randn(H_KV, d, r, generator=torch.Generator().manual_seed(seed)) / math.sqrt(r)
    for h in range(H_KV):
        torch.testing.assert_close(g[h], expected[h], rtol=1e-6, atol=0.0)
    # The sketch's entries have variance 1/r (a sanity check of the scaling, loose).
    assert abs(g.var().item() * r - 1.0) < 0.3


@pytest.mark.parametrize("leverage", ["kv_product", "key", "value", "kv_avg"])
@pytest.mark.parametrize("projection_dim", [20, 5, None])
@pytest.mark.parametrize("local_window", [None, 16, 7])
@pytest.mark.parametrize("n,d", [(50, 16), (203, 64)])
def test_curdkv_scores_match_algorithm_1(leverage, projection_dim, local_window, n, d):
    keys, values = make_states(n, d, seed=n + d)
    press = CurDKVPress(
        compression_ratio=0.5, estimator="projection", projection_dim=projection_dim, leverage=leverage,
        local_window=local_window, seed=3,
    )
    got = press.score(view_of(keys, values))
    assert got.dtype == torch.float32
    assert got.shape == (B, H_KV, n)
    ref = ref_curdkv_scores(
        keys, values, seed=3, projection_dim=projection_dim, leverage=leverage, local_window=local_window
    )
    close(got, ref, rtol=1e-4, atol=1e-9)
    # Normalisation: 1 per head, or 1 per window (the last window may be shorter).
    windows = 1 if local_window is None else math.ceil(n / local_window)
    close(got.sum(-1), float(windows), rtol=1e-5, atol=0)


@pytest.mark.parametrize("leverage", ["kv_product", "kv_avg"])
@pytest.mark.parametrize("ratio,num_sinks", [(0.5, 4), (0.8, 0), (0.9, 4)])
def test_curdkv_compress_keeps_sinks_and_top_scores(leverage, ratio, num_sinks):
    n, d = 120, 16
    keys, values = make_states(n, d, seed=11)
    press = CurDKVPress(compression_ratio=ratio, estimator="projection", leverage=leverage, num_sinks=num_sinks, seed=5)
    kept_k, kept_v, evicted = compress_states(press, keys, values, None, None, 0)
    n_keep = kept_count(n, ratio)
    assert evicted == n - n_keep
    assert kept_k.shape == kept_v.shape == (B, H_KV, n_keep, d)
    ref = ref_curdkv_scores(keys, values, seed=5, projection_dim=20, leverage=leverage, local_window=None)
    for b in range(B):
        for h in range(H_KV):
            idx = ref_topk_indices(ref[b, h], n_keep, sinks=num_sinks)
            assert idx[:num_sinks] == list(range(num_sinks))
            torch.testing.assert_close(kept_k[b, h], keys[b, h, idx], rtol=0, atol=0)
            torch.testing.assert_close(kept_v[b, h], values[b, h, idx], rtol=0, atol=0)


@pytest.mark.parametrize("leverage", ["kv_product", "key", "kv_avg"])
def test_curdkv_seed_repeats_and_differs(leverage):
    keys, values = make_states(80, 16, seed=1)
    v = view_of(keys, values)
    a = CurDKVPress(estimator="projection", leverage=leverage, seed=42).score(v)
    b = CurDKVPress(estimator="projection", leverage=leverage, seed=42).score(v)
    c = CurDKVPress(estimator="projection", leverage=leverage, seed=43).score(v)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c, rtol=1e-3, atol=0)
    # The sketch is cached per press: calling again gives the very same scores.
    press = CurDKVPress(estimator="projection", leverage=leverage, seed=42)
    assert torch.equal(press.score(v), press.score(v))
    assert torch.equal(press.score(v), a)


# --------------------------------------------------------------------------- CurDKV, exact leverage


def ref_svd_leverage(x: torch.Tensor, rank: int | None = None) -> torch.Tensor:
    """Squared row norms of U from a float64 thin SVD, per head; [B, H, N]."""
    out = torch.empty(x.shape[:3], dtype=torch.float64)
    for b in range(x.shape[0]):
        for h in range(x.shape[1]):
            u, s, _ = torch.linalg.svd(x[b, h].double(), full_matrices=False)
            k = u.shape[1] if rank is None else rank
            out[b, h] = u[:, :k].square().sum(-1)
    return out


def _plain(n, d, gen):
    return torch.randn(B, H_KV, n, d, generator=gen)


EXACT_CASES = {
    # name: (N, D, builder(gen) -> float32 [B, H, N, D], rank)
    "square_ish": (50, 16, lambda g: _plain(50, 16, g), 16),
    "n_300_d_64": (300, 64, lambda g: _plain(300, 64, g), 64),
    "n_much_larger_than_d": (4000, 16, lambda g: _plain(4000, 16, g), 16),
    "global_scale_1e-4": (200, 64, lambda g: _plain(200, 64, g) * 1e-4, 64),
    "global_scale_1e4": (200, 64, lambda g: _plain(200, 64, g) * 1e4, 64),
    "outlier_channels_x30": (300, 64, lambda g: _plain(300, 64, g) * torch.where(torch.arange(64) < 4, 30.0, 1.0), 64),
    # Badly scaled columns (channel magnitudes from 1e-2 to 1e2, as with outlier channels
    # of real keys). Leverage is invariant to column scaling, so the SVD answer is as easy
    # as for the unscaled matrix.
    "column_scales_1e-2_to_1e2": (300, 64, lambda g: _plain(300, 64, g) * torch.logspace(-2, 2, 64), 64),
    "rank_deficient_rank_5": (
        150,
        16,
        lambda g: torch.randn(B, H_KV, 150, 5, generator=g) @ torch.randn(B, H_KV, 5, 16, generator=g),
        5,
    ),
}


@pytest.mark.parametrize("case", list(EXACT_CASES))
def test_exact_leverage_matches_float64_svd(case):
    n, d, build, rank = EXACT_CASES[case]
    gen = torch.Generator().manual_seed(123)
    keys = build(gen).float()
    values = build(gen).float()
    press = CurDKVPress(estimator="exact", leverage="key", **CACHED)
    lk, lv = press.leverages(view_of(keys, values))
    assert lk.shape == lv.shape == (B, H_KV, n)
    ref_k = ref_svd_leverage(keys, rank)
    ref_v = ref_svd_leverage(values, rank)
    # Leverage of a rank-r matrix sums to r per head (here r = D unless rank deficient).
    close(lk.sum(-1), float(rank), rtol=1e-3, atol=0)
    close(lv.sum(-1), float(rank), rtol=1e-3, atol=0)
    close(lk, ref_k, rtol=1e-3, atol=1e-6)
    close(lv, ref_v, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("leverage", ["kv_product", "key", "value", "kv_avg"])
def test_exact_estimator_scores_are_normalised_svd_leverage(leverage):
    n, d = 120, 16
    keys, values = make_states(n, d, seed=9)
    # projection_dim is ignored by the exact estimator.
    got = CurDKVPress(estimator="exact", leverage=leverage, projection_dim=3, **CACHED).score(view_of(keys, values))
    lk = ref_svd_leverage(keys)
    lv = ref_svd_leverage(values)
    nk = lk / lk.sum(-1, keepdim=True)
    nv = lv / lv.sum(-1, keepdim=True)
    ref = {
        "kv_product": (lk * lv) / (lk * lv).sum(-1, keepdim=True),
        "key": nk,
        "value": nv,
        "kv_avg": 0.5 * (nk + nv),
    }[leverage]
    close(got, ref, rtol=1e-3, atol=1e-9)


def test_exact_leverage_stays_finite_on_near_collinear_heads():
    # Half the channels are copies of one channel up to 1e-5 noise, in bfloat16 like real keys:
    # the unit-scaled Gram matrix is singular up to the ridge. Leverage must stay a valid
    # distribution (each in [0, 1], summing to at most D), never NaN.
    from curdkv.presses.curdkv import exact_leverage

    gen = torch.Generator().manual_seed(5)
    n, d = 2000, 64
    base = torch.randn(1, 2, n, d, generator=gen)
    base[..., d // 2 :] = base[..., :1] + 1e-5 * torch.randn(1, 2, n, d // 2, generator=gen)
    base[..., 0] *= 300.0  # one massive channel
    lev = exact_leverage(base.bfloat16())
    assert lev.dtype == torch.float32 and bool(torch.isfinite(lev).all())
    assert float(lev.min()) >= 0.0 and float(lev.max()) <= 1.0 + 1e-4
    sums = lev.sum(-1)
    assert bool(((sums > d // 2 - 1) & (sums <= d + 1e-3)).all())


# --------------------------------------------------------------------------- the study's options


def _svd_leverage(x: torch.Tensor, rank=None, centre=False) -> torch.Tensor:
    """Squared row norms of U (its first ``rank`` columns) in the SVD of each head's matrix, float64."""
    x = x.double()
    if centre:
        x = x - x.mean(dim=-2, keepdim=True)
    u, s, _ = torch.linalg.svd(x, full_matrices=False)
    return u[..., : rank or u.shape[-1]].square().sum(-1)


@pytest.mark.parametrize("rank,centre", [(None, False), (3, False), (None, True), (5, True)])
def test_subspace_leverage_is_the_svd_leverage(rank, centre):
    from curdkv.presses.curdkv import exact_leverage, subspace_leverage

    x = torch.randn(2, 3, 50, 8, generator=torch.Generator().manual_seed(4)) * torch.linspace(0.1, 10, 8)
    got = subspace_leverage(x, ridge=1e-12, rank=rank, centre=centre)
    torch.testing.assert_close(got.double(), _svd_leverage(x, rank, centre), rtol=1e-5, atol=1e-7)
    if rank is None and not centre:  # the default route agrees with the study's
        torch.testing.assert_close(subspace_leverage(x), exact_leverage(x), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("options", [{"key_space": "pre_rope", "centre": False}, {"key_space": "post_rope", "centre": True},
                                     {}])
def test_pre_rope_and_centred_states_take_the_default_route_with_the_study_routes_scores(options):
    from helpers import attention_module, rotate
    from curdkv.presses.curdkv import subspace_leverage
    from curdkv.presses.rope import unrotate

    g = torch.Generator().manual_seed(6)
    pre = torch.randn(2, 2, 60, 16, generator=g) * torch.linspace(0.2, 5, 16)
    values = torch.randn(2, 2, 60, 16, generator=g) + 3.0  # an offset, which centring removes
    view = ScoringView(keys=rotate(pre, "tiny-llama"), values=values, queries=None,
                       module=attention_module("tiny-llama"), layer_idx=0)
    press = CurDKVPress(0.5, **options)
    assert press.transforms_states and not press.subspace_route
    keys = unrotate(view.keys, view.module) if press.key_space == "pre_rope" else view.keys
    want = (subspace_leverage(keys, centre=press.centre), subspace_leverage(values, centre=press.centre))  # float64
    for got, ref in zip(press.leverages(view), want):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)
    assert CurDKVPress(0.5, rank=4).subspace_route and not CurDKVPress(0.5, **CACHED).transforms_states


def test_the_default_states_are_pre_rope_and_centred_except_where_a_route_reads_the_cached_ones():
    default = CurDKVPress(0.5)
    assert (default.key_space, default.centre) == ("pre_rope", True)
    sketch = CurDKVPress(0.5, estimator="projection")
    assert (sketch.key_space, sketch.centre) == ("post_rope", False)
    reconstruction = CurDKVPress(0.5, row_space="reconstruction_queries", rank=3)
    assert (reconstruction.key_space, reconstruction.centre) == ("post_rope", False)
    import curdkv

    paper_keys = curdkv.get_press("curdkv-post-rope", 0.5)
    assert (paper_keys.key_space, paper_keys.centre, paper_keys.estimator) == ("post_rope", False, "exact")
    with pytest.raises(ValueError, match="apply to the exact estimator"):
        CurDKVPress(0.5, estimator="projection", key_space="pre_rope")
    # Without the attention module there is no RoPE to undo: the error says how to score the cached keys.
    keys, values = make_states(30, 8, seed=2)
    with pytest.raises(ValueError, match="curdkv-post-rope"):
        default.score(view_of(keys, values))


def test_the_study_options_reach_the_scores():
    from helpers import attention_module, rotate
    from curdkv.presses.rope import unrotate

    g = torch.Generator().manual_seed(5)
    pre = torch.randn(1, 2, 40, 16, generator=g)
    values = torch.randn(1, 2, 40, 16, generator=g)
    view = ScoringView(keys=rotate(pre, "tiny-llama"), values=values, queries=None,
                       module=attention_module("tiny-llama"), layer_idx=0)
    cached = CurDKVPress(0.5, **CACHED).score(view)
    assert torch.allclose(CurDKVPress(0.5, ridge=2e-6, **CACHED).score(view), cached, atol=1e-5)  # same scores
    pre_rope = CurDKVPress(0.5, key_space="pre_rope", centre=False).score(view)
    unrotated = ScoringView(keys=unrotate(view.keys, view.module), values=values, queries=None, module=None,
                            layer_idx=0)
    torch.testing.assert_close(pre_rope, CurDKVPress(0.5, ridge=2e-6, **CACHED).score(unrotated), rtol=1e-4, atol=1e-7)
    assert not torch.allclose(pre_rope, cached, atol=1e-4)  # RoPE changes leverage: the option matters
    for options in ({"key_space": "post_rope", "centre": True}, {"rank": 4, **CACHED}):
        assert not torch.allclose(CurDKVPress(0.5, **options).score(view), cached, atol=1e-4)
    with pytest.raises(ValueError, match="apply to the exact estimator"):
        CurDKVPress(0.5, estimator="projection", rank=4)
    with pytest.raises(ValueError, match="key_space must be one of"):
        CurDKVPress(0.5, key_space="rope")


def test_key_leverage_in_the_window_queries_directions():
    """Queries spanning 3 directions: key leverage is that of the keys' coordinates in those directions."""
    from curdkv.presses.curdkv import subspace_leverage

    g = torch.Generator().manual_seed(6)
    basis, _ = torch.linalg.qr(torch.randn(16, 3, generator=g, dtype=torch.float64))  # [D, 3] orthonormal
    queries = (torch.randn(1, 4, 20, 3, generator=g, dtype=torch.float64) @ basis.T).float()  # 4 heads, 2 KV heads
    keys = torch.randn(1, 2, 50, 16, generator=g)
    values = torch.randn(1, 2, 50, 16, generator=g)
    view = ScoringView(keys=keys, values=values, queries=queries, module=None, layer_idx=0)
    press = CurDKVPress(0.5, row_space="window_queries", rank=3, window=20, **CACHED)
    lk, lv = press.leverages(view)
    expected = subspace_leverage(keys.double() @ basis)  # the coordinates in any basis of the span
    torch.testing.assert_close(lk, expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(lv, subspace_leverage(values), rtol=1e-6, atol=1e-8)
    assert press.query_window == 20 and CurDKVPress(0.5).query_window == 0
    with pytest.raises(ValueError, match="needs rank"):
        CurDKVPress(0.5, row_space="window_queries")


@pytest.mark.parametrize("spec", ["curdkv:row_space=window_queries:rank=8:window=16",
                                  "curdkv:key_space=pre_rope:centre=true", "curdkv:layer_budget=leverage_mass",
                                  "curdkv:layer_budget=context_attention",
                                  "curdkv:layer_budget=context_attention:leverage_floor=0.25",
                                  "curdkv:layer_budget=context_attention:leverage_floor=0.25:attention_queries=16"])
def test_study_variants_keep_the_same_tokens_in_both_paths(spec):
    import curdkv
    from conftest import random_ids, tiny_model
    from curdkv.cache.dense import CompressedCache
    from curdkv.transformers_compat import forward_with_cache

    model, ids = tiny_model("tiny-qwen3"), random_ids(90, seed=7)
    press = curdkv.get_press(spec, 0.6)
    swept = curdkv.capture_prefill(model, ids, query_window=press.query_window).build_cache(press)
    cache = CompressedCache()
    with curdkv.compress(model, press):
        forward_with_cache(model, cache, input_ids=ids, use_cache=True)
    assert all(torch.equal(a.keys, b.keys) for a, b in zip(swept.layers, cache.layers))


def test_shared_threshold_keeps_count_the_top_entries_of_every_layer():
    from curdkv.selection import shared_threshold_keeps

    gen = torch.Generator().manual_seed(3)
    # Layer 0's heads each put their mass on a few tokens, layer 1's spread it: layer 1 needs more tokens.
    peaked = torch.rand(1, 2, 40, generator=gen) ** 30
    flat = 1 + 0.1 * torch.rand(1, 2, 40, generator=gen)
    scores = [s / s.sum(-1, keepdim=True) for s in (peaked, flat)]
    n_keep, sinks = 12, 2
    keeps = shared_threshold_keeps(scores, n_keep, 40, sinks)
    # The slow obvious count: sinks first, then the largest entries over both layers.
    entries = sorted(((float("inf") if t < sinks else float(s[0, h, t]), layer)
                      for layer, s in enumerate(scores) for h in range(2) for t in range(40)), reverse=True)
    counts = [sum(1 for _, layer in entries[: n_keep * 2 * 2] if layer == i) for i in (0, 1)]
    assert keeps == [round(c / 2) for c in counts]
    assert keeps[0] < n_keep < keeps[1] and sum(keeps) == 2 * n_keep
    assert shared_threshold_keeps(scores, 40, 40, sinks) == [40, 40]


def test_leverage_mass_budgets_differ_by_layer_and_keep_the_ratio_on_average():
    import curdkv
    from conftest import random_ids, tiny_model

    model, ids = tiny_model("tiny-llama"), random_ids(120, seed=2)
    capture = curdkv.capture_prefill(model, ids)
    uniform = capture.build_cache(curdkv.get_press("curdkv", 0.7))
    press = curdkv.get_press("curdkv:layer_budget=leverage_mass", 0.7)
    assert press.needs_full_prefill and not curdkv.get_press("curdkv", 0.7).needs_full_prefill
    # Each head of layer 0 keeps only its sinks' share of the mass, layer 1's spread it: layer 1 gets the budget.
    scores = [torch.zeros(1, 2, 120), torch.ones(1, 2, 120) / 120]
    scores[0][..., 4:8] = 0.25
    keeps = press.layer_keeps(scores, 120)
    assert keeps[0] < 36 < keeps[1] and sum(keeps) == 2 * 36
    adapted = capture.build_cache(press)
    lengths = [layer.keys.shape[2] for layer in adapted.layers]
    assert lengths == press.layer_keeps(capture.scores(press, capture.window_queries(press)), 120)
    assert sum(lengths) == 2 * uniform.layers[0].keys.shape[2] == 2 * 36
    with pytest.raises(ValueError, match="layer_budget must be one of"):
        curdkv.get_press("curdkv:layer_budget=global", 0.5)


def ref_peak_context_attention(queries, keys, scaling):
    """Every query against every key of its KV head, no mask, in float64; the largest probability per key."""
    b_, h = queries.shape[:2]
    group = h // keys.shape[1]
    out = torch.zeros(b_, keys.shape[1], keys.shape[2], dtype=torch.float64)
    for b in range(b_):
        for head in range(h):
            probs = torch.softmax(queries[b, head].double() @ keys[b, head // group].double().T * scaling, dim=-1)
            out[b, head // group] = torch.maximum(out[b, head // group], probs.max(dim=0).values)
    return out.float()


def test_peak_context_attention_is_the_largest_unmasked_probability_over_the_group():
    from curdkv.presses.peak_attention import peak_context_attention

    gen = torch.Generator().manual_seed(11)
    queries, keys = torch.randn(2, 6, 37, 8, generator=gen), torch.randn(2, 3, 37, 8, generator=gen)
    expected = ref_peak_context_attention(queries, keys, 0.4)
    # Chunks of 5 queries: 37 is no multiple, so the last chunk is short.
    close(peak_context_attention(queries, keys, 0.4, chunk_size=5), expected, rtol=1e-5, atol=1e-7)
    # No causal mask: the last key is read by the first query as by the last.
    assert (expected[..., -1] > 0).all()
    with pytest.raises(ValueError, match="cannot share"):
        peak_context_attention(queries[:, :5], keys, 0.4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the half-precision logits run on CUDA; run on the GPU machine")
def test_peak_context_attention_in_bf16_on_cuda_is_close_to_float64():
    from curdkv.presses.peak_attention import peak_context_attention

    gen = torch.Generator().manual_seed(12)
    queries, keys = torch.randn(1, 8, 300, 64, generator=gen), torch.randn(1, 2, 300, 64, generator=gen)
    expected = ref_peak_context_attention(queries, keys, 0.125)
    got = peak_context_attention(queries.cuda().bfloat16(), keys.cuda().bfloat16(), 0.125, chunk_size=64).cpu()
    assert got.dtype == torch.float32
    assert (got.double() - expected).norm() / expected.norm() < 2e-2


def test_context_attention_budgets_are_one_threshold_over_layers_and_heads():
    import curdkv
    from conftest import random_ids, tiny_model
    from curdkv.cache.ragged import RaggedLayer

    model, ids = tiny_model("tiny-llama"), random_ids(100, seed=4)
    press = curdkv.get_press("curdkv:layer_budget=context_attention", 0.7)
    assert press.head_adaptive and press.needs_full_prefill and press.query_window >= 100
    assert not curdkv.get_press("curdkv", 0.7).head_adaptive
    capture = curdkv.capture_prefill(model, ids, query_window=press.query_window)
    queries = capture.window_queries(press)
    view = ScoringView(capture.keys[1], capture.values[1], queries[1], capture.modules[1], 1)
    # The score: CurDKV's distribution times N times the peak attention each token receives from the
    # context's queries read back at positions N + 16 + i: undone at i and redone there by the model's own RoPE.
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, rotate_half

    q = queries[1].double()
    cos, sin = (t.double() for t in model.model.rotary_emb(q, torch.arange(100)[None]))
    plain = q * cos - rotate_half(q) * sin
    cos, sin = (t.double() for t in model.model.rotary_emb(q, torch.arange(116, 216)[None]))
    read_back, _ = apply_rotary_pos_emb(plain, plain, cos, sin)
    leverage = CurDKVPress(0.7).score(view)
    peak = ref_peak_context_attention(read_back, capture.keys[1], view.scaling)
    close(press.score(view), leverage * 100 * peak, rtol=1e-4, atol=1e-8)
    # Where they were prefilled, later keys sit ahead of the queries: a different score.
    assert not torch.allclose(peak, ref_peak_context_attention(queries[1], capture.keys[1], view.scaling), rtol=0.01)
    # attention_queries=10: the peak over queries 0, 11, ..., 99 alone, read back as before.
    sparse = curdkv.get_press("curdkv:layer_budget=context_attention:attention_queries=10", 0.7)
    every_eleventh = ref_peak_context_attention(read_back[:, :, ::11], capture.keys[1], view.scaling)
    close(sparse.score(view), leverage * 100 * every_eleventh, rtol=1e-4, atol=1e-8)
    assert not torch.allclose(every_eleventh, peak, rtol=0.01)
    cache = capture.build_cache(press)
    assert all(isinstance(layer, RaggedLayer) for layer in cache.layers)
    held = [layer.lengths.float().mean().item() for layer in cache.layers]
    expected = press.layer_keeps(capture.scores(press, queries), 100)
    assert [round(h) for h in held] == expected and sum(expected) == 2 * 30
    with pytest.raises(ValueError, match="queries of all 100 context tokens"):
        press.score(ScoringView(view.keys, view.values, queries[1][:, :, -10:], view.module, 1))


def test_leverage_floor_keeps_each_heads_top_leverage_before_the_shared_threshold():
    import curdkv
    from conftest import random_ids, tiny_model

    model, ids = tiny_model("tiny-llama"), random_ids(100, seed=4)
    press = curdkv.get_press("curdkv:layer_budget=context_attention:leverage_floor=0.5", 0.8)
    plain = curdkv.get_press("curdkv:layer_budget=context_attention", 0.8)
    capture = curdkv.capture_prefill(model, ids, query_window=press.query_window)
    queries = capture.window_queries(press)
    cache = capture.build_cache(press)
    for i, layer in enumerate(cache.layers):
        view = ScoringView(capture.keys[i], capture.values[i], queries[i], capture.modules[i], i)
        leverage, shared = CurDKVPress(0.8).score(view), plain.score(view)
        # The floor: half of the uniform 20 tokens per head, the top 10 by leverage, lifted by N above the rest.
        floor = torch.zeros_like(shared).scatter_(-1, leverage.topk(10, dim=-1).indices, 100.0)
        close(press.score(view), shared + floor, rtol=1e-5, atol=1e-7)
        assert float(shared.max()) <= 100.0
        # Every head of every layer holds its floor's keys, whatever the threshold gave its layer.
        for h in range(view.num_kv_heads):
            held = layer.context_keys[int(layer.offsets[h]) : int(layer.offsets[h + 1])]
            for t in leverage[0, h].topk(10).indices.tolist():
                assert (held == capture.keys[i][0, h, t]).all(-1).any(), (i, h, t)
    assert sum(press.layer_keeps(capture.scores(press, queries), 100)) == 2 * 20
    with pytest.raises(ValueError, match="needs layer_budget='context_attention'"):
        CurDKVPress(0.5, leverage_floor=0.5)
    with pytest.raises(ValueError, match=r"leverage_floor must be in \[0, 1\]"):
        CurDKVPress(0.5, layer_budget="context_attention", leverage_floor=1.5)
    with pytest.raises(ValueError, match="attention_queries.*needs layer_budget='context_attention'"):
        CurDKVPress(0.5, attention_queries=64)
    with pytest.raises(ValueError, match="attention_queries"):
        CurDKVPress(0.5, layer_budget="context_attention", attention_queries=1)


def test_context_attention_within_each_layer_keeps_uniform_layer_budgets_and_shares_them_over_heads():
    import curdkv
    from conftest import random_ids, tiny_model

    model, ids = tiny_model("tiny-llama"), random_ids(100, seed=8)
    press = curdkv.get_press("curdkv:layer_budget=context_attention:shared_over_layers=false", 0.7)
    shared = curdkv.get_press("curdkv:layer_budget=context_attention", 0.7)
    assert press.head_adaptive
    capture = curdkv.capture_prefill(model, ids, query_window=press.query_window)
    queries = capture.window_queries(press)
    cache = capture.build_cache(press)
    assert press.layer_keeps(capture.scores(press, queries), 100) == [30, 30]
    assert shared.layer_keeps(capture.scores(shared, queries), 100) == [33, 27]  # one threshold over both layers
    for i, layer in enumerate(cache.layers):
        # The layer's 2 x 30 slots go to its top 60 scores over both heads (sinks first), not 30 per head.
        score = shared.score(ScoringView(capture.keys[i], capture.values[i], queries[i], capture.modules[i], i))[0]
        score[:, :4] = float("inf")
        top = score.flatten().topk(60).indices
        assert layer.lengths.tolist() == [[int((top // 100 == h).sum()) for h in range(2)]]
        assert layer.lengths.sum() == 60
    assert min(int(layer.lengths.min()) for layer in cache.layers) < 30  # the heads' shares differ
    with pytest.raises(ValueError, match="shared_over_layers=False .* needs layer_budget='context_attention'"):
        CurDKVPress(0.5, shared_over_layers=False)
    with pytest.raises(ValueError, match="shared_over_layers must be True or False"):
        CurDKVPress(0.5, layer_budget="context_attention", shared_over_layers="no")


def test_layer_floor_keeps_each_layers_top_share_before_the_threshold_over_layers():
    import curdkv
    from conftest import random_ids, tiny_model

    model, ids = tiny_model("tiny-llama"), random_ids(100, seed=8)
    spec = "curdkv:layer_budget=context_attention"
    capture = curdkv.capture_prefill(model, ids, query_window=curdkv.get_press(spec, 0.7).query_window)
    queries = capture.window_queries(curdkv.get_press(spec, 0.7))

    def keeps(press):
        return press.layer_keeps(capture.scores(press, queries), 100)

    assert keeps(curdkv.get_press(spec, 0.7)) == [33, 27]  # one threshold: layer 1 under its uniform 30 per head
    floored = curdkv.get_press(spec + ":layer_floor=0.95", 0.7)
    assert min(keeps(floored)) >= 28 and sum(keeps(floored)) == 2 * 30
    # Each layer holds its own top 2 x 28 scores (sinks counted), whatever the threshold gave it.
    cache = capture.build_cache(floored)
    plain = curdkv.get_press(spec, 0.7)
    for i, layer in enumerate(cache.layers):
        score = plain.score(ScoringView(capture.keys[i], capture.values[i], queries[i], capture.modules[i], i))[0]
        score[:, :4] = float("inf")
        for flat in score.flatten().topk(56).indices.tolist():
            h, t = divmod(flat, 100)
            held = layer.context_keys[int(layer.offsets[h]) : int(layer.offsets[h + 1])]
            assert (held == capture.keys[i][0, h, t]).all(-1).any(), (i, h, t)
    # A floor of the whole budget is the uniform layer budgets shared over each layer's heads.
    whole = capture.build_cache(curdkv.get_press(spec + ":layer_floor=1.0", 0.7))
    within = capture.build_cache(curdkv.get_press(spec + ":shared_over_layers=false", 0.7))
    for a, b in zip(whole.layers, within.layers):
        assert torch.equal(a.lengths, b.lengths) and torch.equal(a.context_keys, b.context_keys)
    with pytest.raises(ValueError, match="layer_floor=0.5 .* needs layer_budget='context_attention'"):
        CurDKVPress(0.5, layer_floor=0.5)
    with pytest.raises(ValueError, match="shared_over_layers=True"):
        CurDKVPress(0.5, layer_budget="context_attention", shared_over_layers=False, layer_floor=0.5)
    with pytest.raises(ValueError, match=r"layer_floor must be in \[0, 1\]"):
        CurDKVPress(0.5, layer_budget="context_attention", layer_floor=2.0)


@pytest.mark.parametrize("pooling", ["max", "avg"])
def test_pooled_scores_are_the_neighbourhood_of_each_token_renormalised(pooling):
    keys, values = make_states(40, 8, seed=5)
    plain = CurDKVPress(0.5, **CACHED).score(view_of(keys, values))
    pooled = CurDKVPress(0.5, pool_kernel=5, pooling=pooling, **CACHED).score(view_of(keys, values))
    # The slow obvious pooling: each token's window of 5, cut at the edges.
    ref = torch.empty_like(plain)
    for t in range(40):
        window = plain[..., max(0, t - 2) : t + 3]
        ref[..., t] = window.amax(-1) if pooling == "max" else window.mean(-1)
    close(pooled, ref / ref.sum(-1, keepdim=True), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="pool_kernel must be odd"):
        CurDKVPress(0.5, pool_kernel=4)
    with pytest.raises(ValueError, match="pooling must be one of"):
        CurDKVPress(0.5, pool_kernel=3, pooling="median")


def test_max_pooling_keeps_the_neighbours_of_a_high_leverage_token():
    keys, values = make_states(60, 8, seed=1)
    keys[:, :, 30] *= 40  # one key far out: the top leverage of every head
    values[:, :, 30] *= 40
    kept = compress_states(CurDKVPress(0.8, num_sinks=0, pool_kernel=5, **CACHED), keys, values, None, None, 0)[0]
    assert kept.shape[2] == 12
    # Every head keeps tokens 28..32 as whole keys: find them among the kept keys.
    for b in range(keys.shape[0]):
        for h in range(keys.shape[1]):
            for t in range(28, 33):
                assert (kept[b, h] == keys[b, h, t]).all(-1).any()


def test_key_leverage_in_the_reconstruction_queries_directions():
    """The Gram gathered over the passes' queries of a known span: leverage in that span, as for window queries."""
    from curdkv.presses.curdkv import subspace_leverage

    g = torch.Generator().manual_seed(8)
    basis, _ = torch.linalg.qr(torch.randn(16, 3, generator=g, dtype=torch.float64))
    keys, values = torch.randn(1, 2, 50, 16, generator=g), torch.randn(1, 2, 50, 16, generator=g)
    press = CurDKVPress(0.5, row_space="reconstruction_queries", rank=3)
    assert press.reconstructs_context and press.needs_full_prefill and press.query_window == 0
    state = press.reconstruction_state(1, 2, 50, 16, keys.device)
    for start in (0, 25):  # two chunks' passes, each of 12 queries per head
        queries = (torch.randn(1, 4, 12, 3, generator=g, dtype=torch.float64) @ basis.T).float()
        press.absorb_chunk(state, queries, keys[:, :, :0], keys[:, :, start : start + 25], keys[:, :, :12], start, 0.25)
    view = ScoringView(keys=keys, values=values, queries=None, module=None, layer_idx=0, reconstruction=state)
    lk, _ = press.leverages(view)
    torch.testing.assert_close(lk, subspace_leverage(keys.double() @ basis), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="the view has none"):
        press.score(ScoringView(keys=keys, values=values, queries=None, module=None, layer_idx=0))
    with pytest.raises(ValueError, match="needs rank"):
        CurDKVPress(0.5, row_space="reconstruction_queries")
    with pytest.raises(ValueError, match="key_space must be 'post_rope'"):
        CurDKVPress(0.5, row_space="reconstruction_queries", rank=3, key_space="pre_rope")


@pytest.mark.parametrize("spec", ["curdkv:row_space=reconstruction_queries:rank=8",
                                  "adacurdkv:row_space=reconstruction_queries:rank=8"])
def test_reconstruction_row_space_keeps_the_same_tokens_in_both_paths(spec):
    import curdkv
    from conftest import tiny_model
    from curdkv.cache.ragged import RaggedLayer
    from test_context import ByteTokenizer, _text

    model, tokenizer = tiny_model("tiny-llama"), ByteTokenizer()
    text = _text(120, 5)
    press = curdkv.get_press(spec, 0.6)
    swept = curdkv.CompressedContext.from_capture(model, tokenizer, curdkv.capture_prefill(model, text, tokenizer),
                                                  press)
    alone = curdkv.prefill(model, tokenizer, text, press)
    plain = curdkv.prefill(model, tokenizer, text, curdkv.get_press(spec.split(":")[0], 0.6))
    def kept(layer):  # a head-adaptive press's ragged layer holds its context in context_keys
        return layer.context_keys if isinstance(layer, RaggedLayer) else layer.keys

    for a, b in zip(swept.cache.layers, alone.cache.layers):
        assert torch.equal(kept(a), kept(b))
    # The reconstruction's directions change which keys are kept.
    assert any(kept(a).shape != kept(b).shape or not torch.equal(kept(a), kept(b))
               for a, b in zip(alone.cache.layers, plain.cache.layers))
    assert alone.ask("what?", 4) == swept.ask("what?", 4)
