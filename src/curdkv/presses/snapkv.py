"""SnapKV: keep what the last context queries attend to."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..kernels.common import on_kernel_device
from ..kernels.window_attention import window_attention_mean as fused_window_mean, window_mean_supported
from .base import ScoringView, WindowPress, check_odd_kernel


def last_queries(view: ScoringView, window: int) -> torch.Tensor:
    """The last ``window`` context queries ``[B, H, W, D]``, or a clear error if fewer were captured."""
    if view.queries is None or view.queries.shape[2] < window:
        have = 0 if view.queries is None else view.queries.shape[2]
        raise ValueError(f"the press needs the last {window} context queries, the runtime captured {have}")
    return view.queries[:, :, -window:]


def window_logits(view: ScoringView, window: int, keys_upto: int | None = None) -> torch.Tensor:
    """Scaled logits of the last ``window`` queries to the first ``keys_upto`` keys (all by default).

    float32 ``[B, H_kv, G, W, keys_upto]``, unmasked: the G query heads of a
    GQA group read their KV head.
    """
    q = last_queries(view, window).float()
    k = view.keys[:, :, :keys_upto].float()
    b, h, w, d = q.shape
    h_kv = k.shape[1]
    if h % h_kv:
        raise ValueError(f"{h} query heads cannot share {h_kv} KV heads evenly")
    return torch.einsum("bkgwd,bknd->bkgwn", q.reshape(b, h_kv, h // h_kv, w, d), k) * view.scaling


def window_hidden(seq_len: int, window: int, device) -> torch.Tensor:
    """Bool ``[W, N]``: which keys window query i (at position ``N - W + i``) may not see."""
    q_pos = torch.arange(seq_len - window, seq_len, device=device)[:, None]
    return torch.arange(seq_len, device=device)[None, :] > q_pos


def window_attention(view: ScoringView, window: int) -> torch.Tensor:
    """Softmax attention of the last ``window`` queries to every key, float32 ``[B, H, W, N]``.

    Causal inside the window: window query i sits at position ``N - W + i``
    and sees keys up to it. GQA: query head h reads KV head ``h // group``.
    """
    logits = window_logits(view, window)
    b, h_kv, g, w, n = logits.shape
    hidden = window_hidden(n, w, logits.device)
    return logits.masked_fill(hidden, float("-inf")).softmax(-1).reshape(b, h_kv * g, w, n)


def window_attention_mean(view: ScoringView, window: int) -> torch.Tensor:
    """:func:`window_attention` averaged over the window, for the keys before it: float32 ``[B, H, N - W]``.

    On CUDA a fused kernel (:mod:`curdkv.kernels.window_attention`) does it
    without the ``[B, H, W, N]`` matrix.
    """
    q, n = last_queries(view, window), view.keys.shape[2]
    if on_kernel_device(q) and window_mean_supported(q, view.keys):
        return fused_window_mean(q, view.keys, view.scaling, n - window)
    return window_attention(view, window)[..., : n - window].mean(2)


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
    comparable across heads (AdaKV ranks them jointly).
    """

    kernel_size: int = 5

    scores_comparable_across_heads = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_odd_kernel("kernel_size", self.kernel_size)

    def score(self, view: ScoringView) -> torch.Tensor:
        n, w = self.window_bounds(view)
        attn = window_attention_mean(view, w)  # [B, H, N - W]
        pad = self.kernel_size // 2
        pooled = F.avg_pool1d(attn, self.kernel_size, stride=1, padding=pad, count_include_pad=False)
        b, h = pooled.shape[:2]
        h_kv = view.num_kv_heads
        return self.with_window(pooled.view(b, h_kv, h // h_kv, n - w).mean(2))
