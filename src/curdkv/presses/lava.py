"""LAVa: one score for heads and layers alike, from the loss it causes in the residual stream."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..selection import check_alpha, check_budget, kept_count
from .base import ScoringView, check_odd_kernel, pool_scores
from .window import WindowPress, window_attention_mean


def lava_scores(view: ScoringView, window: int, kernel_size: int) -> torch.Tensor:
    """LAVa's token scores outside the window, ``[B, H_kv, N - W]``.

    The window queries' mean attention to each token, max-pooled, times the
    head's largest value L1 norm (outside the window), the maximum over the
    query heads of each GQA group.
    """
    n = view.seq_len
    attn = window_attention_mean(view, window)  # [B, H, N - W]
    pooled = pool_scores(attn, "max", kernel_size)
    b, h = pooled.shape[:2]
    h_kv = view.num_kv_heads
    v_bound = view.values[:, :, : n - window].float().abs().sum(-1).amax(-1)  # [B, H_kv]
    per_kv = pooled.view(b, h_kv, h // h_kv, n - window).amax(2)
    return per_kv * v_bound[..., None]


def normalised_entropy(scores: torch.Tensor) -> float:
    """Entropy of a layer's scores as one distribution over all heads and tokens, divided by its maximum.

    ``scores``: ``[B, H_kv, M]``; the batch mean of each row's entropy.
    """
    flat = scores.float().flatten(1).clamp_min(0)
    p = flat / (flat.sum(-1, keepdim=True) + 1e-16)
    entropy = -(p * torch.log(p + 1e-16)).sum(-1)
    return float(entropy.mean()) / math.log(max(flat.shape[1], 2))


@dataclass
class LAVaPress(WindowPress):
    """LAVa (Shen et al. 2025, "LAVa: Layer-wise KV Cache Eviction with Dynamic Budget Allocation",
    arXiv 2509.09754; code MGDDestiny/Lava).

    Evicting token i of head h changes the layer's residual-stream output by
    at most its attention weight times a bound on the head's value norms, so
    the score is the window queries' mean attention to i (max-pooled over
    ``kernel_size`` neighbours) times ``max_k ‖v_k‖₁`` of the head, the
    maximum over the query heads of a GQA group (:func:`lava_scores`). Those
    scores share one scale across heads and layers, which gives both budgets:

    - heads: the layer's budget goes to its top scores over all KV heads,
      after each head keeps its own top ``alpha`` share (AdaKVPress's safeguard);
      the cache is ragged, so what each head evicts is really freed;
    - layers: each layer's share of the total budget outside the windows is
      proportional to the normalised entropy of its scores (a flat score
      distribution needs more tokens to keep the same mass).

    The window tokens are always kept. Defaults follow the authors'
    LongBench script (window 32, max pooling of width 7, alpha 0.2).

    Differences from the code: the layer budgets are set once from every
    layer's scores after the prefill (the code recomputes them after each
    layer from the layers seen so far and shrinks earlier layers; the final
    budgets are the same, but the code's early layers briefly hold more and
    its later layers less); the full cache is therefore held until the
    prefill ends. A layer whose share exceeds its context keeps it all, as
    in the code (the excess is not redistributed), and the safeguard is
    curdkv's AdaKVPress one (a share of this layer's budget, where the code uses a
    share of the configured budget).
    """

    window_size: int = 32
    kernel_size: int = 7
    alpha: float = 0.2

    scores_comparable_across_heads = True
    head_adaptive = True
    needs_full_prefill = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_odd_kernel("kernel_size", self.kernel_size)
        self.alpha = check_alpha(self.alpha)

    @property
    def name(self) -> str:
        return "lava"

    def score(self, view: ScoringView) -> torch.Tensor:
        _, w = self.window_bounds(view)
        return self.with_window(lava_scores(view, w, self.kernel_size))

    def layer_keeps(self, scores: list[torch.Tensor], seq_len: int) -> list[int]:
        w = self.window_size
        n_keep = kept_count(seq_len, self.compression_ratio)
        # The mean budget must hold the window, as for every window press: else every layer
        # would keep its window and the ratio would silently not be met.
        check_budget(seq_len, n_keep, self.protected_sinks, self.protected_recent)
        outside = max(n_keep - w, 0) * len(scores)
        entropies = [normalised_entropy(s[..., : seq_len - w]) for s in scores]
        total = sum(entropies)
        if total <= 0:  # every layer's mass on one token: no basis to prefer a layer
            return [n_keep] * len(scores)
        return [min(seq_len, w + int(e / total * outside)) for e in entropies]
