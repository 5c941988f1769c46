"""RandomPress: seeded, repeatable scores."""

from __future__ import annotations

import pytest
import torch

from curdkv.presses import RandomPress
from helpers import B, H_KV, compress_states, make_states, view_of

# Small tensor ops single-threaded for the module (see conftest's one_thread): on a small
# shared CPU a 2-thread LAPACK call can stall waiting on a busy core.
pytestmark = pytest.mark.usefixtures("one_thread")


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
