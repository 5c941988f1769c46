"""MorphKV: keep what the most recent tokens attend to, at a constant cache size."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import ScoringView, check_choice
from .window import WindowPress, window_logits

FUSIONS = ("sum", "max")


def recent_attention(view: ScoringView, window: int) -> torch.Tensor:
    """Attention of the last ``window`` queries to the tokens before them, ``[B, H, W, N - W]``.

    The softmax runs over those earlier tokens only: MorphKV ranks old tokens
    against each other, so the weight a query puts on its recent neighbours
    does not dilute the ranking.
    """
    logits = window_logits(view, window, keys_upto=view.seq_len - window)
    b, h_kv, g, w, m = logits.shape
    return logits.softmax(-1).reshape(b, h_kv * g, w, m)


@dataclass
class MorphKVPress(WindowPress):
    """MorphKV (Ghadia et al. 2025, "Dialogue Without Limits: Constant-Sized KV Caches for Extended
    Responses in LLMs", arXiv 2503.00979).

    The cache holds the ``window_size`` most recent tokens plus the older
    tokens those recent tokens attend to most: each older token's score is
    the softmax attention (over older tokens only) of each of the last
    ``window_size`` queries, taken as the maximum over the query heads of its
    GQA group, then fused over the window by ``fusion`` (``"sum"`` or
    ``"max"``). Used alone it compresses the prefill like a pooling-free
    SnapKV; with ``curdkv.compress(model, MorphKVPress(...), max_cache_tokens=C)``
    it re-scores the cache at every decoding step and holds it at ``C``
    tokens per KV head for the whole generation, which is the paper's method
    (:mod:`curdkv.runtime.decoding`).

    Differences from the paper's code: the window's queries include the
    current token's (the code scores with the previous ``W`` queries and keeps
    ``W + 1`` recent tokens); the same tokens are kept for every query head
    of a KV head, which is what the code's KV pruning does too; a long prompt
    is cut at the end of the prefill rather than at the first decoding step,
    from the same last prompt queries.
    Defaults follow the authors' LongBench command (window 32, ``sum``).
    """

    window_size: int = 32
    fusion: str = "sum"

    scores_comparable_across_heads = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("fusion", self.fusion, FUSIONS)

    def score(self, view: ScoringView) -> torch.Tensor:
        n, w = self.window_bounds(view)
        attn = recent_attention(view, w)  # [B, H, W, N - W]
        b, h = attn.shape[:2]
        h_kv = view.num_kv_heads
        per_kv = attn.view(b, h_kv, h // h_kv, w, n - w).amax(2)
        return self.with_window(per_kv.sum(2) if self.fusion == "sum" else per_kv.amax(2))
