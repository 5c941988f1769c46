"""MorphKV: keep what the most recent tokens attend to, at a constant cache size."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Press, ScoringView, check_choice, check_int

FUSIONS = ("sum", "max")


def recent_attention(view: ScoringView, window: int) -> torch.Tensor:
    """Attention of the last ``window`` queries to the tokens before them, ``[B, H, W, N - W]``.

    The softmax runs over those earlier tokens only: MorphKV ranks old tokens
    against each other, so the weight a query puts on its recent neighbours
    does not dilute the ranking.
    """
    if view.queries is None or view.queries.shape[2] < window:
        have = 0 if view.queries is None else view.queries.shape[2]
        raise ValueError(f"the press needs the last {window} queries, the runtime captured {have}")
    q = view.queries[:, :, -window:].float()
    n = view.seq_len
    k = view.keys[:, :, : n - window].float()
    b, h, w, d = q.shape
    h_kv = k.shape[1]
    logits = torch.einsum("bkgwd,bknd->bkgwn", q.view(b, h_kv, h // h_kv, w, d), k) * view.scaling
    return logits.softmax(-1).reshape(b, h, w, n - window)


@dataclass
class MorphKVPress(Press):
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
    (:mod:`curdkv.decoding`).

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
        check_int("window_size", self.window_size, 1)
        check_choice("fusion", self.fusion, FUSIONS)

    @property
    def protected_recent(self) -> int:
        return self.window_size

    @property
    def query_window(self) -> int:
        return self.window_size

    def score(self, view: ScoringView) -> torch.Tensor:
        n, w = view.seq_len, self.window_size
        if n <= w:
            raise ValueError(f"MorphKV needs a context longer than window_size={w}, got {n} tokens")
        attn = recent_attention(view, w)  # [B, H, W, N - W]
        b, h = attn.shape[:2]
        h_kv = view.num_kv_heads
        per_kv = attn.view(b, h_kv, h // h_kv, w, n - w).amax(2)
        fused = per_kv.sum(2) if self.fusion == "sum" else per_kv.amax(2)
        # The recent window is protected; its score only fills the tensor.
        top = fused.amax(-1, keepdim=True).expand(-1, -1, w)
        return torch.cat([fused, top], dim=-1)
