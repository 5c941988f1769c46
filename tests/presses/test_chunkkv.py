"""ChunkKV against a slow, obvious reference written inside the test, and over other presses."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import curdkv
from curdkv import AdaCurDKVPress
from curdkv.cache.gather import gather_tokens
from curdkv.presses import ChunkKVPress, CurDKVPress, Press, ScoringView, SnapKVPress
from curdkv.selection import kept_count, select_uniform
from curdkv.transformers_compat import forward_with_cache

from conftest import random_ids
from helpers import B, H_KV, compress_states, make_states, view_of

# Small tensor ops single-threaded for the module (see conftest's one_thread): on a small
# shared CPU a 2-thread LAPACK call can stall waiting on a busy core.
pytestmark = pytest.mark.usefixtures("one_thread")


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


def test_chunkkv_over_pyramidkv_keeps_its_layer_budgets(tiny_models):
    """ChunkKV used to drop its base's budgets: every layer got the uniform one."""
    model = tiny_models("tiny-llama", torch.float32)
    ids = random_ids(256, seed=14)
    chunked = curdkv.ChunkKVPress(0.5, chunk_size=8, press=curdkv.presses.PyramidKVPress(window_size=16))
    pyramid = [curdkv.presses.PyramidKVPress(0.5, window_size=16).layer_keep(256, i, 2) for i in range(2)]
    assert pyramid[0] != pyramid[1]
    assert [chunked.layer_keep(256, i, 2) for i in range(2)] == pyramid
    live = curdkv.CompressedCache()
    with curdkv.compress(model, chunked, layout="dense"):
        forward_with_cache(model, live, input_ids=ids, use_cache=True)
    assert [layer.stored_length for layer in live.layers] == pyramid


@pytest.mark.parametrize("base", [lambda: AdaCurDKVPress(0.5), lambda: curdkv.presses.LAVaPress()], ids=["AdaCurDKVPress", "LAVa"])
def test_chunkkv_refuses_a_head_adaptive_base(base):
    with pytest.raises(ValueError, match="ChunkKV keeps the same chunks in every head"):
        curdkv.ChunkKVPress(0.5, press=base())
