"""SnapKV: keep what the last context queries attend to."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import ScoringView, check_odd_kernel, pool_scores
from .window import WindowPress, window_attention_mean


@dataclass
class SnapKVPress(WindowPress):
    """SnapKV (Li et al. 2024, arXiv 2404.14469).

    The last ``window_size`` context tokens form the observation window; each
    earlier key is scored by the window queries' softmax attention to it,
    averaged over the window, smoothed by average pooling of width
    ``kernel_size`` and averaged over the query heads of each GQA group. The
    window's own tokens are always kept.

    Differences from the paper: the window is the end of the *context* (the
    question is not seen, the query-agnostic setting), scores are averaged
    over the GQA group so every KV head keeps one set of tokens, and the
    window queries are those the model computed during prefill (captured by
    the attention function, not recomputed).

    The scores of one head are attention probabilities, so they are
    comparable across heads (AdaKVPress ranks them jointly).
    """

    kernel_size: int = 5

    scores_comparable_across_heads = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_odd_kernel("kernel_size", self.kernel_size)

    def score(self, view: ScoringView) -> torch.Tensor:
        n, w = self.window_bounds(view)
        attn = window_attention_mean(view, w)  # [B, H, N - W]
        pooled = pool_scores(attn, "avg", self.kernel_size)
        b, h = pooled.shape[:2]
        h_kv = view.num_kv_heads
        return self.with_window(pooled.view(b, h_kv, h // h_kv, n - w).mean(2))
