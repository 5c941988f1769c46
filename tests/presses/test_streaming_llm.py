"""StreamingLLM against the obvious expectation: the sinks and the most recent tokens."""

from __future__ import annotations

import pytest
import torch

from curdkv.presses import StreamingLLMPress
from curdkv.selection import kept_count, select_uniform
from helpers import B, H_KV, compress_states, make_states, view_of

# Small tensor ops single-threaded for the module (see conftest's one_thread): on a small
# shared CPU a 2-thread LAPACK call can stall waiting on a busy core.
pytestmark = pytest.mark.usefixtures("one_thread")


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
