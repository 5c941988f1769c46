"""SnapKV against a slow, obvious reference written inside the test (float64, per query head and window query)."""

from __future__ import annotations

import math

import pytest
import torch

from curdkv.cache.gather import gather_tokens
from curdkv.presses import SnapKVPress
from curdkv.selection import kept_count, select_uniform
from helpers import B, H_KV, close, compress_states, make_states, ref_topk_indices, view_of

# Small tensor ops single-threaded for the module (see conftest's one_thread): on a small
# shared CPU a 2-thread LAPACK call can stall waiting on a busy core.
pytestmark = pytest.mark.usefixtures("one_thread")


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
