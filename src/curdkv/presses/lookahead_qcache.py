"""Lookahead Q-Cache: score with the queries of tokens the model is about to generate."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Press, ScoringView, check_int, check_odd_kernel, pool_scores
from .snapkv import SnapKVPress

TEMPORARY_WINDOW = 32


def lookahead_attention(view: ScoringView, window: int, lookahead: int) -> torch.Tensor:
    """Softmax attention of the window queries and the pseudo queries to every key, ``[B, H, W + m, N]``.

    ``view.queries`` holds the last ``window`` context queries followed by
    ``lookahead`` pseudo queries. Window query i sits at position
    ``N - W + i`` and sees keys up to it; pseudo queries come after the
    context and see every key.
    """
    pseudo = view.pseudo_queries
    if pseudo is None or pseudo.shape[2] != lookahead:
        raise ValueError(
            f"the press needs {lookahead} pseudo queries, got {0 if pseudo is None else pseudo.shape[2]} "
            "(compress with curdkv.compress / curdkv.prefill or PrefillCapture.build_cache, which decode them)"
        )
    have = 0 if view.queries is None else view.queries.shape[2]
    if have < window:
        raise ValueError(f"the press needs the last {window} context queries, the runtime captured {have}")
    window_q = view.queries[:, :, have - window :] if window else view.queries[:, :, :0]
    q = torch.cat([window_q, pseudo.to(window_q.dtype)], dim=2).float()
    k = view.keys.float()
    b, h, rows, d = q.shape
    h_kv, n = k.shape[1], k.shape[2]
    logits = torch.einsum("bkgwd,bknd->bkgwn", q.view(b, h_kv, h // h_kv, rows, d), k) * view.scaling
    q_pos = torch.cat([
        torch.arange(n - window, n, device=k.device),
        torch.full((lookahead,), n, device=k.device),
    ])[:, None]
    logits = logits.masked_fill(torch.arange(n, device=k.device)[None, :] > q_pos, float("-inf"))
    return logits.softmax(-1).reshape(b, h, rows, n)


@dataclass
class LookaheadQCachePress(Press):
    """Lookahead Q-Cache (Wang et al. 2025, "Lookahead Q-Cache: Achieving More Consistent KV Eviction
    via Pseudo Query", arXiv 2505.20334).

    The observation window of SnapKV-style presses holds the *context's* last
    queries, which need not resemble the queries of the answer to come. This
    press first compresses the context temporarily (:meth:`lookahead_press`,
    SnapKV at the same ratio with window 32 and pooling width 7), greedily
    decodes ``lookahead_tokens`` tokens from that cache, records the queries
    every layer computes for them (pseudo queries, :mod:`curdkv.runtime.lookahead`),
    drops the temporary cache, and scores the full context with the last
    ``window_size`` context queries together with the pseudo queries: the
    summed softmax attention of those rows to each key, max-pooled over
    ``kernel_size`` neighbours and averaged over the GQA group. The last
    ``window_size`` tokens are always kept.

    Defaults follow the paper's repository (8 pseudo queries, an extra
    window of 8 context queries, pooling width 7). Differences: the
    temporary compression is curdkv's SnapKVPress (average pooling) rather
    than the repository's max-pooled SnapKV; every one of the
    ``lookahead_tokens`` is decoded (the repository stops at an end token);
    window rows are causal and pseudo rows see the whole context (the
    repository's mask hides the last context keys from some rows); one token
    set per KV head (the repository selects per query head). Compression
    happens after the whole prefill, so the peak memory is the full cache's.
    """

    window_size: int = 8
    lookahead_tokens: int = 8
    kernel_size: int = 7

    scores_comparable_across_heads = True
    scores_depend_on_ratio = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("window_size", self.window_size, 0)
        check_int("lookahead_tokens", self.lookahead_tokens, 1)
        check_odd_kernel("kernel_size", self.kernel_size)

    @property
    def name(self) -> str:
        return "lookahead"

    @property
    def protected_recent(self) -> int:
        return self.window_size

    @property
    def query_window(self) -> int:
        # The temporary SnapKV compression reads the last 32 context queries.
        return max(self.window_size, TEMPORARY_WINDOW)

    def lookahead_press(self) -> Press:
        """The temporary compression the pseudo queries are decoded from."""
        return SnapKVPress(compression_ratio=self.compression_ratio, window_size=TEMPORARY_WINDOW, kernel_size=7)

    def score(self, view: ScoringView) -> torch.Tensor:
        n, w = view.seq_len, self.window_size
        if n <= w:
            raise ValueError(f"Lookahead Q-Cache needs a context longer than window_size={w}, got {n} tokens")
        attn = lookahead_attention(view, w, self.lookahead_tokens)[..., : n - w].sum(2)  # [B, H, N - W]
        pooled = pool_scores(attn, "max", self.kernel_size)
        b, h = pooled.shape[:2]
        h_kv = view.num_kv_heads
        per_kv = pooled.view(b, h_kv, h // h_kv, n - w).mean(2)
        if w == 0:
            return per_kv
        top = per_kv.amax(-1, keepdim=True).expand(-1, -1, w)
        return torch.cat([per_kv, top], dim=-1)
