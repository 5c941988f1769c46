"""SnapKV: keep what the last context queries attend to."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import Press, ScoringView, check_int


def window_attention(view: ScoringView, window: int) -> torch.Tensor:
    """Softmax attention of the last ``window`` queries to every key, float32 ``[B, H, W, N]``.

    Causal inside the window: window query i sits at position ``N - W + i``
    and sees keys up to it. GQA: query head h reads KV head ``h // group``.
    """
    if view.queries is None or view.queries.shape[2] < window:
        have = 0 if view.queries is None else view.queries.shape[2]
        raise ValueError(f"the press needs the last {window} context queries, the runtime captured {have}")
    q = view.queries[:, :, -window:].float()
    k = view.keys.float()
    b, h, w, d = q.shape
    h_kv, n = k.shape[1], k.shape[2]
    group = h // h_kv
    logits = torch.einsum("bkgwd,bknd->bkgwn", q.view(b, h_kv, group, w, d), k) * view.scaling
    q_pos = torch.arange(n - w, n, device=k.device)[:, None]
    k_pos = torch.arange(n, device=k.device)[None, :]
    logits = logits.masked_fill(k_pos > q_pos, float("-inf"))
    return logits.softmax(-1).reshape(b, h, w, n)


@dataclass
class SnapKVPress(Press):
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

    window_size: int = 64
    kernel_size: int = 5

    scores_comparable_across_heads = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("window_size", self.window_size, 1)
        check_int("kernel_size", self.kernel_size, 1)
        if self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd so pooling keeps positions aligned, got {self.kernel_size}")

    @property
    def protected_recent(self) -> int:
        return self.window_size

    @property
    def query_window(self) -> int:
        return self.window_size

    def score(self, view: ScoringView) -> torch.Tensor:
        n, w = view.seq_len, self.window_size
        if n <= w:
            raise ValueError(f"SnapKV needs a context longer than window_size={w}, got {n} tokens")
        attn = window_attention(view, w)[..., : n - w].mean(2)  # [B, H, N - W]
        pad = self.kernel_size // 2
        pooled = F.avg_pool1d(attn, self.kernel_size, stride=1, padding=pad, count_include_pad=False)
        b, h = pooled.shape[:2]
        h_kv = view.num_kv_heads
        per_kv = pooled.view(b, h_kv, h // h_kv, n - w).mean(2)
        # Window tokens are protected; give them the top score so the tensor covers all N tokens.
        top = per_kv.amax(-1, keepdim=True).expand(-1, -1, w)
        return torch.cat([per_kv, top], dim=-1)
