"""Token selection (select_uniform, kept_count) and gathering against slow, obvious references."""

from __future__ import annotations

import pytest
import torch

from curdkv.cache.gather import gather_tokens
from curdkv.selection import kept_count, select_uniform
from helpers import B, H_KV, make_states, ref_topk_indices

# Small tensor ops single-threaded for the module (see conftest's one_thread): on a small
# shared CPU a 2-thread LAPACK call can stall waiting on a busy core.
pytestmark = pytest.mark.usefixtures("one_thread")


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
