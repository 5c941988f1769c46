"""From scores to kept indices: budgets and protected tokens.

Selection does not know which press made the scores. It enforces what every
press may ask for (first-token sinks and a recent window that are always
kept), turns a compression ratio into a per-head budget, and returns sorted
indices so the kept tokens stay in context order.
"""

from __future__ import annotations

import torch


def kept_count(seq_len: int, compression_ratio: float) -> int:
    """Tokens each KV head keeps out of ``seq_len`` at ``compression_ratio``.

    The removed count is rounded down, so ratio 0 keeps everything and any
    ratio below 1 keeps at least one token.
    """
    if not 0.0 <= compression_ratio < 1.0:
        raise ValueError(f"compression_ratio must be in [0, 1), got {compression_ratio!r}")
    removed = int(seq_len * compression_ratio + 1e-9)
    # A ratio a hair below 1 must not round to an empty cache.
    return max(seq_len - removed, min(seq_len, 1))


def check_budget(seq_len: int, n_keep: int, sinks: int, recent: int) -> None:
    """Raise a clear error when the context cannot honour the protected tokens."""
    if seq_len == 0:
        raise ValueError("the context is empty: there is nothing to compress")
    protected = sinks + recent
    if seq_len < protected:
        raise ValueError(
            f"the context has {seq_len} tokens, fewer than the {protected} the press protects "
            f"(num_sinks={sinks} + window={recent}); use a longer context or smaller num_sinks/window"
        )
    if n_keep < protected:
        raise ValueError(
            f"the budget of {n_keep} tokens per head (from {seq_len} tokens) is smaller than the {protected} "
            f"protected tokens (num_sinks={sinks} + window={recent}); lower compression_ratio"
        )


def protect(scores: torch.Tensor, sinks: int, recent: int) -> torch.Tensor:
    """Scores ``[..., N]`` with the protected positions raised above every other."""
    if sinks == 0 and recent == 0:
        return scores
    # Clamp infinities first: a press scoring some token +inf must not tie with
    # (and so possibly displace) a protected token.
    finfo = torch.finfo(scores.dtype)
    scores = torch.nan_to_num(scores, posinf=finfo.max, neginf=finfo.min)
    n = scores.shape[-1]
    if sinks:
        scores[..., : min(sinks, n)] = float("inf")
    if recent:
        scores[..., max(n - recent, 0) :] = float("inf")
    return scores


def select_uniform(scores: torch.Tensor, n_keep: int, sinks: int = 0, recent: int = 0) -> torch.Tensor:
    """Top-``n_keep`` tokens of every KV head; returns sorted indices ``[B, H_kv, n_keep]``."""
    if scores.dim() != 3:
        raise ValueError(f"scores must have shape [B, H_kv, N], got {tuple(scores.shape)}")
    n = scores.shape[-1]
    check_budget(n, n_keep, sinks, recent)
    if torch.isnan(scores).any():
        raise ValueError("the press returned NaN scores")
    scores = protect(scores.float(), sinks, recent)
    idx = scores.topk(n_keep, dim=-1, sorted=False).indices
    return idx.sort(dim=-1).values


def gather_tokens(states: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``states[b, h, indices[b, h, i], :]`` for ``states [B, H, N, D]``, ``indices [B, H, k]``."""
    expanded = indices.unsqueeze(-1).expand(-1, -1, -1, states.shape[-1])
    return states.gather(2, expanded)
