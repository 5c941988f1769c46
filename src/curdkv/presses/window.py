"""The observation window: presses that score from the last context queries.

:class:`WindowPress` is their base (the window's size and pooling, and its
tokens always kept). The helpers below are the attention of those queries
over the context, shared by SnapKV, LAVa, MorphKV and OBCache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels.common import on_kernel_device
from ..kernels.window_attention import window_attention_mean as fused_window_mean
from ..kernels.window_attention import window_mean_supported
from .base import Press, ScoringView, check_int


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
class WindowPress(Press):
    """A press that scores from the last ``window_size`` context queries (the observation window).

    It reads those queries and always keeps the window's own tokens; its
    :meth:`score` ranks the tokens before the window and fills the window's
    places with :meth:`with_window`.
    """

    window_size: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("window_size", self.window_size, 1)

    @property
    def protected_recent(self) -> int:
        return self.window_size

    @property
    def query_window(self) -> int:
        return self.window_size

    def window_bounds(self, view: ScoringView) -> tuple[int, int]:
        """``(N, W)``, after checking that some tokens lie before the window."""
        n, w = view.seq_len, self.window_size
        if n <= w:
            label = type(self).__name__.removesuffix("Press")
            raise ValueError(f"{label} needs a context longer than window_size={w}, got {n} tokens")
        return n, w

    def with_window(self, scores: torch.Tensor) -> torch.Tensor:
        """``[B, H_kv, N - W]`` scores of the tokens before the window, extended to all ``N``.

        The window is protected; its top score only fills the tensor.
        """
        top = scores.amax(-1, keepdim=True).expand(-1, -1, self.window_size)
        return torch.cat([scores, top], dim=-1)
