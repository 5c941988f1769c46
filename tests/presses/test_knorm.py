"""KNorm against a slow, obvious reference written inside the test."""

from __future__ import annotations

import math

import pytest
import torch

from curdkv.presses import KNormPress
from curdkv.selection import kept_count
from helpers import B, H_KV, compress_states, make_states

# Small tensor ops single-threaded for the module (see conftest's one_thread): on a small
# shared CPU a 2-thread LAPACK call can stall waiting on a busy core.
pytestmark = pytest.mark.usefixtures("one_thread")


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
