"""Every press against a slow, obvious reference written inside the test.

The references use float64 torch ops per head (and per token or per window
query where the rule is a loop in the paper); they share no code with the
library.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from curdkv.presses import (
    ChunkKVPress,
    CurDKVPress,
    KNormPress,
    Press,
    RandomPress,
    ScoringView,
    SnapKVPress,
    StreamingLLMPress,
)
from helpers import compress_states
from curdkv.cache.gather import gather_tokens
from curdkv.selection import kept_count, select_uniform

B, H_KV = 2, 2


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Run this module's small tensor ops single-threaded, then restore.

    The tensors here are tiny; on a small shared CPU a 2-thread LAPACK call
    can stall for half a second waiting on a busy core, which made the SVD
    references dominate the runtime.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------- helpers


def make_states(n: int, d: int, seed: int, b: int = B, h: int = H_KV):
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(b, h, n, d, generator=gen)
    values = torch.randn(b, h, n, d, generator=gen)
    # Rows of different magnitudes so norms and leverages are well spread.
    keys = keys * (0.5 + torch.rand(b, h, n, 1, generator=gen))
    values = values * (0.5 + torch.rand(b, h, n, 1, generator=gen))
    return keys, values


def view_of(keys, values, queries=None, layer_idx=0) -> ScoringView:
    return ScoringView(keys=keys, values=values, queries=queries, module=None, layer_idx=layer_idx)


def close(got: torch.Tensor, ref, rtol: float, atol: float) -> None:
    ref = torch.as_tensor(ref, dtype=torch.float64)
    torch.testing.assert_close(got.double(), ref.expand_as(got), rtol=rtol, atol=atol)


def ref_normalise(scores: torch.Tensor, local_window: int | None) -> torch.Tensor:
    """Scale a 1-D score vector to sum 1, or to sum 1 inside each window of tokens."""
    out = torch.empty_like(scores)
    n = len(scores)
    step = n if local_window is None else local_window
    for start in range(0, n, step):
        chunk = scores[start : start + step]
        out[start : start + step] = chunk / chunk.sum()
    return out


def ref_topk_indices(scores: torch.Tensor, n_keep: int, sinks: int = 0, recent: int = 0) -> list[int]:
    """Protected sinks and recent tokens, then the highest remaining scores."""
    n = len(scores)
    protected = set(range(min(sinks, n))) | set(range(max(n - recent, 0), n))
    rest = [j for j in range(n) if j not in protected]
    rest.sort(key=lambda j: -float(scores[j]))
    return sorted(protected | set(rest[: n_keep - len(protected)]))


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
    press = CurDKVPress(estimator="exact", leverage="key")
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
    got = CurDKVPress(estimator="exact", leverage=leverage, projection_dim=3).score(view_of(keys, values))
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


# --------------------------------------------------------------------------- SnapKV


def ref_snapkv_scores(keys, queries, window, kernel_size):
    """Per query head: causal window softmax, window mean, average pooling, GQA mean. [B, H_kv, N - W]."""
    b_, h_kv, n, d = keys.shape
    h_q = queries.shape[1]
    group = h_q // h_kv
    scale = 1.0 / math.sqrt(d)
    length = n - window
    pad = kernel_size // 2
    out = torch.zeros(b_, h_kv, length, dtype=torch.float64)
    for b in range(b_):
        for hq in range(h_q):
            kv = hq // group
            k = keys[b, kv].double()
            q = queries[b, hq, -window:].double()
            attn = torch.zeros(length, dtype=torch.float64)
            for i in range(window):
                pos = n - window + i  # this window query's position; it sees keys 0..pos
                logits = (k[: pos + 1] @ q[i]) * scale
                p = torch.exp(logits - logits.max())
                p /= p.sum()
                attn += p[:length]
            attn /= window
            pooled = torch.stack(
                [attn[max(0, j - pad) : min(length, j + pad + 1)].mean() for j in range(length)]
            )  # zero padding not counted
            out[b, kv] += pooled / group
    return out


@pytest.mark.parametrize(
    "group,n,d,window,kernel_size,ratio",
    [
        (1, 50, 16, 8, 5, 0.5),
        (2, 120, 64, 16, 7, 0.6),
        (3, 77, 16, 1, 3, 0.3),
        (4, 300, 16, 32, 1, 0.8),
        (4, 64, 64, 20, 9, 0.5),
    ],
)
def test_snapkv_matches_reference_and_keeps_window(group, n, d, window, kernel_size, ratio):
    keys, values = make_states(n, d, seed=n * group)
    gen = torch.Generator().manual_seed(1000 + n)
    # Queries sharper than the keys' unit scale so attention is far from uniform.
    queries = 2.0 * torch.randn(B, H_KV * group, window, d, generator=gen)
    press = SnapKVPress(compression_ratio=ratio, window_size=window, kernel_size=kernel_size)
    assert press.query_window == window
    scores = press.score(view_of(keys, values, queries))
    assert scores.shape == (B, H_KV, n)
    ref = ref_snapkv_scores(keys, queries, window, kernel_size)
    close(scores[..., : n - window], ref, rtol=1e-4, atol=1e-7)

    n_keep = kept_count(n, ratio)
    idx = select_uniform(scores, n_keep, press.protected_sinks, press.protected_recent)
    window_tokens = set(range(n - window, n))
    for b in range(B):
        for h in range(H_KV):
            kept = idx[b, h].tolist()
            assert window_tokens <= set(kept)
            assert kept == ref_topk_indices(torch.cat([ref[b, h], torch.zeros(window)]), n_keep, recent=window)

    # The runtime path keeps the same tokens.
    kept_k, kept_v, _ = compress_states(press, keys, values, queries, None, 0)
    torch.testing.assert_close(kept_k, gather_tokens(keys, idx), rtol=0, atol=0)
    torch.testing.assert_close(kept_v, gather_tokens(values, idx), rtol=0, atol=0)


def test_snapkv_uses_last_window_queries_when_given_more():
    n, d, window = 60, 16, 6
    keys, values = make_states(n, d, seed=2)
    queries = torch.randn(B, H_KV * 2, 10, d, generator=torch.Generator().manual_seed(3))
    press = SnapKVPress(window_size=window, kernel_size=3)
    got = press.score(view_of(keys, values, queries))
    ref = ref_snapkv_scores(keys, queries[:, :, -window:], window, 3)
    close(got[..., : n - window], ref, rtol=1e-4, atol=1e-7)


# --------------------------------------------------------------------------- KNorm


@pytest.mark.parametrize("n,d,ratio", [(50, 16, 0.5), (300, 64, 0.75), (97, 16, 0.1)])
def test_knorm_keeps_lowest_norm_keys(n, d, ratio):
    keys, values = make_states(n, d, seed=n)
    press = KNormPress(compression_ratio=ratio)
    n_keep = kept_count(n, ratio)
    kept_k, kept_v, evicted = compress_states(press, keys, values, None, None, 0)
    assert evicted == n - n_keep
    for b in range(B):
        for h in range(H_KV):
            norms = [math.sqrt(sum(float(x) ** 2 for x in keys[b, h, j])) for j in range(n)]
            lowest = sorted(sorted(range(n), key=lambda j: norms[j])[:n_keep])
            torch.testing.assert_close(kept_k[b, h], keys[b, h, lowest], rtol=0, atol=0)
            torch.testing.assert_close(kept_v[b, h], values[b, h, lowest], rtol=0, atol=0)
            # Every kept key is no larger than every evicted key.
            evicted_idx = set(range(n)) - set(lowest)
            assert max(norms[j] for j in lowest) <= min(norms[j] for j in evicted_idx)


# --------------------------------------------------------------------------- StreamingLLM


@pytest.mark.parametrize("n,ratio,num_sinks", [(50, 0.5, 4), (300, 0.9, 4), (64, 0.25, 0), (100, 0.9, 10)])
def test_streamingllm_keeps_sinks_and_recent(n, ratio, num_sinks):
    keys, values = make_states(n, 16, seed=4)
    press = StreamingLLMPress(compression_ratio=ratio, num_sinks=num_sinks)
    n_keep = kept_count(n, ratio)
    expected = list(range(num_sinks)) + list(range(n - (n_keep - num_sinks), n))
    assert len(expected) == n_keep
    idx = select_uniform(press.score(view_of(keys, values)), n_keep, press.protected_sinks, press.protected_recent)
    for b in range(B):
        for h in range(H_KV):
            assert idx[b, h].tolist() == expected
    kept_k, kept_v, _ = compress_states(press, keys, values, None, None, 0)
    torch.testing.assert_close(kept_k, keys[:, :, expected], rtol=0, atol=0)
    torch.testing.assert_close(kept_v, values[:, :, expected], rtol=0, atol=0)


# --------------------------------------------------------------------------- ChunkKV


@dataclass
class FixedScoresPress(Press):
    """Returns the scores it was given, whatever the view (a base press for ChunkKV)."""

    fixed: torch.Tensor | None = None

    def score(self, view: ScoringView) -> torch.Tensor:
        return self.fixed


def ref_chunk_kept(base: torch.Tensor, chunk_size: int, n_keep: int) -> list[int]:
    """Top chunks whole by summed base score (over tokens and heads); the rest from the next chunk's start."""
    n = base.shape[-1]
    chunks = [list(range(s, min(s + chunk_size, n))) for s in range(0, n, chunk_size)]
    chunk_scores = [sum(float(base[h, j]) for h in range(base.shape[0]) for j in c) for c in chunks]
    order = sorted(range(len(chunks)), key=lambda i: -chunk_scores[i])
    kept: list[int] = []
    for ci in order:
        kept += chunks[ci][: n_keep - len(kept)]
        if len(kept) == n_keep:
            break
    return sorted(kept)


@pytest.mark.parametrize(
    "n,chunk_size,ratio",
    [
        (50, 10, 0.5),  # budget a multiple of chunk_size
        (50, 10, 0.46),  # 27 tokens: 2 whole chunks + 7 leading tokens
        (203, 7, 0.33),  # last chunk short
        (203, 16, 0.8),
        (120, 1, 0.6),  # chunk of one token: plain top-k of head-summed scores
        (50, 64, 0.3),  # a single (short) chunk
    ],
)
def test_chunkkv_keeps_top_chunks(n, chunk_size, ratio):
    keys, values = make_states(n, 16, seed=5)
    base = torch.rand(B, H_KV, n, generator=torch.Generator().manual_seed(n + chunk_size))
    press = ChunkKVPress(compression_ratio=ratio, chunk_size=chunk_size, press=FixedScoresPress(fixed=base))
    n_keep = kept_count(n, ratio)
    scores = press.score(view_of(keys, values))
    assert scores.shape == (B, H_KV, n)
    idx = select_uniform(scores, n_keep, press.protected_sinks, press.protected_recent)
    for b in range(B):
        expected = ref_chunk_kept(base[b].double(), chunk_size, n_keep)
        for h in range(H_KV):
            assert idx[b, h].tolist() == expected  # identical across heads
        # Whole chunks: at most one chunk is partly kept, and then by its leading tokens.
        partial = []
        for s in range(0, n, chunk_size):
            members = set(range(s, min(s + chunk_size, n)))
            got = members & set(expected)
            if got and got != members:
                partial.append(sorted(got))
                assert sorted(got) == list(range(s, s + len(got)))
        assert len(partial) <= 1
        if n % chunk_size == 0 and n_keep % chunk_size == 0:
            assert partial == []
    kept_k, kept_v, _ = compress_states(press, keys, values, None, None, 0)
    torch.testing.assert_close(kept_k, gather_tokens(keys, idx), rtol=0, atol=0)


def test_chunkkv_forwards_base_protection():
    snap = SnapKVPress(window_size=8)
    press = ChunkKVPress(compression_ratio=0.5, chunk_size=4, press=snap)
    assert press.protected_recent == 8
    assert press.query_window == 8
    curd = ChunkKVPress(compression_ratio=0.5, press=CurDKVPress(num_sinks=3))
    assert curd.protected_sinks == 3


# --------------------------------------------------------------------------- Random


def test_random_press_repeatable_with_seed():
    keys, values = make_states(70, 16, seed=0)
    a = RandomPress(seed=1).score(view_of(keys, values, layer_idx=2))
    b = RandomPress(seed=1).score(view_of(keys, values, layer_idx=2))
    other_seed = RandomPress(seed=2).score(view_of(keys, values, layer_idx=2))
    other_layer = RandomPress(seed=1).score(view_of(keys, values, layer_idx=3))
    assert a.shape == (B, H_KV, 70)
    assert torch.equal(a, b)
    assert not torch.equal(a, other_seed)
    assert not torch.equal(a, other_layer)
    assert float(a.min()) >= 0.0 and float(a.max()) < 1.0
    # Compression repeats exactly too.
    press = RandomPress(compression_ratio=0.5, seed=1)
    k1, _, _ = compress_states(press, keys, values, None, None, 2)
    k2, _, _ = compress_states(RandomPress(compression_ratio=0.5, seed=1), keys, values, None, None, 2)
    assert torch.equal(k1, k2)


# --------------------------------------------------------------------------- selection


@pytest.mark.parametrize("n,n_keep,sinks,recent", [(50, 20, 0, 0), (300, 37, 4, 0), (120, 60, 4, 16), (40, 40, 2, 2)])
def test_select_uniform_is_sorted_topk(n, n_keep, sinks, recent):
    scores = torch.randn(B, H_KV, n, generator=torch.Generator().manual_seed(n))
    idx = select_uniform(scores, n_keep, sinks, recent)
    assert idx.shape == (B, H_KV, n_keep)
    assert idx.dtype == torch.int64
    for b in range(B):
        for h in range(H_KV):
            kept = idx[b, h].tolist()
            assert kept == sorted(set(kept))  # sorted, no duplicates
            assert kept == ref_topk_indices(scores[b, h], n_keep, sinks, recent)


def _protected_score_cases(n, sinks, recent):
    gen = torch.Generator().manual_seed(0)
    protected = torch.zeros(n, dtype=torch.bool)
    protected[:sinks] = True
    protected[n - recent :] = True
    rnd = torch.randn(B, H_KV, n, generator=gen)
    return {
        "random": rnd,
        "protected_lowest": torch.where(protected, -1e30, rnd),
        "protected_minus_inf": torch.where(protected, float("-inf"), rnd),
        "constant": torch.ones(B, H_KV, n),
        "others_huge": torch.where(protected, rnd, 1e30),
        "others_plus_inf": torch.where(protected, rnd, float("inf")),
    }


@pytest.mark.parametrize(
    "kind", ["random", "protected_lowest", "protected_minus_inf", "constant", "others_huge", "others_plus_inf"]
)
@pytest.mark.parametrize("sinks,recent,n_keep", [(4, 0, 10), (0, 8, 10), (3, 5, 8), (3, 5, 20)])
def test_select_uniform_keeps_protected_whatever_the_scores(kind, sinks, recent, n_keep):
    n = 60
    scores = _protected_score_cases(n, sinks, recent)[kind]
    idx = select_uniform(scores, n_keep, sinks, recent)
    protected = set(range(sinks)) | set(range(n - recent, n))
    assert idx.shape == (B, H_KV, n_keep)
    for b in range(B):
        for h in range(H_KV):
            assert protected <= set(idx[b, h].tolist()), (kind, idx[b, h].tolist())


@pytest.mark.parametrize("n", [1, 7, 300])
def test_kept_count_ratio_zero_keeps_all(n):
    assert kept_count(n, 0.0) == n


@pytest.mark.parametrize(
    "n,ratio,expected",
    [
        (100, 0.5, 50),
        (7, 0.5, 4),  # removed count rounded down
        (10, 0.3, 7),  # 10 * 0.3 = 3.0000000000000004
        (10, 0.7, 3),  # 10 * 0.7 = 7.000000000000001
        (100, 0.29, 71),  # 100 * 0.29 = 28.999999999999996: still 29 removed
        (100, 0.07, 93),
        (3, 0.9, 1),
        (1, 0.99, 1),
        (1000, 0.999, 1),
        (0, 0.5, 0),
    ],
)
def test_kept_count_exact_values(n, ratio, expected):
    assert kept_count(n, ratio) == expected


@pytest.mark.parametrize("n,ratio", [(10, 0.99), (10, 1 - 1e-10), (1000, 1 - 1e-13), (5, 0.9999999)])
def test_kept_count_keeps_at_least_one_below_ratio_one(n, ratio):
    # Documented: "any ratio below 1 keeps at least one token".
    assert kept_count(n, ratio) >= 1


def test_gather_tokens_equals_advanced_indexing():
    n, d, k = 90, 16, 25
    keys, _ = make_states(n, d, seed=6)
    gen = torch.Generator().manual_seed(8)
    indices = torch.stack(
        [torch.stack([torch.randperm(n, generator=gen)[:k].sort().values for _ in range(H_KV)]) for _ in range(B)]
    )
    got = gather_tokens(keys, indices)
    b_idx = torch.arange(B)[:, None, None]
    h_idx = torch.arange(H_KV)[None, :, None]
    assert torch.equal(got, keys[b_idx, h_idx, indices])
    for b in range(B):
        for h in range(H_KV):
            for i in range(k):
                assert torch.equal(got[b, h, i], keys[b, h, indices[b, h, i]])
    # A non-contiguous cache (e.g. a transposed view) gives the same result.
    strided = keys.transpose(0, 1).contiguous().transpose(0, 1)
    assert not strided.is_contiguous()
    assert torch.equal(gather_tokens(strided, indices), got)


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
