"""H2O: keep the heavy hitters, the tokens that received the most attention."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import ALL_QUERIES, Press, ScoringView, check_int


def chunk_attention_sums(queries: torch.Tensor, keys: torch.Tensor, start: int) -> torch.Tensor:
    """Column sums of causal softmax attention for one chunk of queries, ``[B, H_kv, end]``.

    ``queries`` ``[B, H_kv, G, C, D]`` float32, already multiplied by the
    logit scaling, are the context tokens ``start .. start + C - 1`` (query t
    sees keys ``0 .. t``); ``keys`` ``[B, H_kv, end, D]`` float32 with
    ``end = start + C``, the only keys these queries can see. Sums run over
    the chunk's queries and the G query heads. The chunk's ``[B, H, C, end]``
    logits are the only large tensor, turned into probabilities in place.
    """
    b, h_kv, g, c, d = queries.shape
    # Rows are the G * C (query head, query) pairs of each KV head: [B, H_kv, G * C, end].
    probs = torch.matmul(queries.reshape(b, h_kv, g * c, d), keys.transpose(-1, -2))
    # Keys before the chunk are visible to all its queries: only the diagonal block needs the mask.
    future = torch.ones(c, c, dtype=torch.bool, device=keys.device).triu_(1)
    probs.view(b, h_kv, g, c, -1)[..., start:].masked_fill_(future, float("-inf"))
    # Every row sees its own key, so its max is finite and exp never meets inf - inf.
    probs.sub_(probs.amax(-1, keepdim=True)).exp_()
    # Normalising the rows inside the column sum (a matrix product) reads the tensor once
    # instead of rewriting it.
    inv_rows = probs.sum(-1).reciprocal_().unsqueeze(2)  # [B, H_kv, 1, G * C]
    return torch.matmul(inv_rows, probs).squeeze(2)


def accumulated_attention(queries: torch.Tensor, keys: torch.Tensor, scaling: float, chunk_size: int) -> torch.Tensor:
    """Attention each key receives from every context query, float32 ``[B, H_kv, N]``.

    ``queries`` ``[B, H, N, D]`` are the N context tokens' queries, ``keys``
    ``[B, H_kv, N, D]``; query head h reads KV head ``h // (H / H_kv)``, and a KV
    head's score is the mean over its query heads. Queries go through in chunks
    of ``chunk_size``, so the N x N attention matrix never exists: memory is
    ``O(B * H * chunk_size * N)``.
    """
    b, h, n, d = queries.shape
    h_kv = keys.shape[1]
    if h % h_kv:
        raise ValueError(f"{h} query heads cannot share {h_kv} KV heads evenly")
    group = h // h_kv
    k = keys.float()
    total = torch.zeros(b, h_kv, n, dtype=torch.float32, device=keys.device)
    for start in range(0, n, chunk_size):
        end = min(start + chunk_size, n)
        q = (queries[:, :, start:end].float() * scaling).reshape(b, h_kv, group, end - start, d)
        total[:, :, :end] += chunk_attention_sums(q, k[:, :, :end], start)
    return total.div_(group)


@dataclass
class H2OPress(Press):
    """H2O, Heavy-Hitter Oracle (Zhang et al. 2023, arXiv 2306.14048).

    A token's score is its accumulated attention: the sum, over every context
    query that can see it (causal), of the softmax attention it receives,
    averaged over the query heads of each GQA group. The last ``window_size``
    tokens are always kept (H2O's recent tokens); the rest of the budget goes
    to the highest-scoring tokens (the heavy hitters).

    The scores are computed from the prefill's queries in chunks of
    ``chunk_size`` queries, so the press works with sdpa or FlashAttention
    (no attention matrix is needed from the model) and its extra memory is
    ``O(B * H * chunk_size * N)`` floats instead of the ``N x N`` matrix. Its
    cost stays quadratic in N: every query meets every earlier key.

    Differences from the paper: (1) the paper splits the budget between heavy
    hitters and recent tokens as fractions of the context (equal halves in the
    released scripts); here the recent part is a fixed ``window_size`` tokens
    (default 64, SnapKV's window), since a press protects a token count, and
    heavy hitters take the rest; (2) the paper evicts greedily token by token
    as generation proceeds, accumulating attention only over tokens still
    cached; here the prefilled context is compressed once, with attention
    accumulated over all its queries (as the authors' prefill code does);
    (3) GQA, absent from the paper's models, is handled by averaging over
    each group's query heads, so a group keeps one set of tokens; (4) scores
    are per batch element (the released code sums them over the batch);
    (5) sums are plain, as in the paper, not divided by the number of queries
    that see each key (kvpress's observed-attention press does that), so early
    tokens are favoured.

    Attention rows sum to 1 in every head, so scores share one scale across
    heads and AdaKV may rank them jointly.
    """

    window_size: int = 64
    chunk_size: int = 128

    scores_comparable_across_heads = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("window_size", self.window_size, 0)
        check_int("chunk_size", self.chunk_size, 1)

    @property
    def protected_recent(self) -> int:
        return self.window_size

    @property
    def query_window(self) -> int:
        return ALL_QUERIES

    def score(self, view: ScoringView) -> torch.Tensor:
        return accumulated_attention(view.context_queries("H2O"), view.keys, view.scaling, self.chunk_size)
