"""ChunkKV: keep whole chunks of tokens, ranked by a base press."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .base import Press, ScoringView, WrapperPress, check_int, check_press
from .snapkv import SnapKVPress


@dataclass
class ChunkKVPress(WrapperPress):
    """ChunkKV (Liu et al. 2025, arXiv 2502.00299).

    Tokens are grouped in consecutive chunks of ``chunk_size``; a chunk's score
    is the sum over its tokens and over all KV heads of the base press's
    scores (SnapKV by default, as in the paper), and whole top chunks are kept,
    the same chunks for every head so semantic units stay intact.

    The press expresses this as token scores: every token gets its chunk's
    rank plus a tie-breaker that prefers earlier tokens inside a chunk, so a
    plain per-head top-k keeps the top chunks whole and, when the budget is not
    a multiple of ``chunk_size``, the leading tokens of the next chunk.
    Differences from the paper: no layer-wise index reuse; the base press's
    protected tokens stay protected, and its budgets (PyramidKV's per layer)
    are taken at ChunkKV's ratio; a head-adaptive base is refused, since
    every head keeps the same chunks.
    """

    chunk_size: int = 10
    press: Press = field(default_factory=SnapKVPress)

    # Every head keeps the same chunks: chunk scores are one ranking shared by all heads.
    scores_comparable_across_heads = True
    head_adaptive = False
    alpha = 0.0
    own_traits = ("scores_comparable_across_heads", "head_adaptive", "alpha")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("chunk_size", self.chunk_size, 1)
        check_press(self.press)
        if self.press.head_adaptive:
            raise ValueError(
                f"press must give every head one budget; ChunkKV keeps the same chunks in every head, "
                f"so the head-adaptive {self.press.name!r} cannot be its base"
            )

    def score(self, view: ScoringView) -> torch.Tensor:
        base = self.press.score(view).float()  # [B, H_kv, N]
        b, h, n = base.shape
        finite = torch.where(torch.isfinite(base), base, torch.zeros_like(base))
        per_token = finite.sum(1)  # [B, N]
        c = self.chunk_size
        pad = (-n) % c
        chunks = torch.nn.functional.pad(per_token, (0, pad)).view(b, -1, c).sum(-1)  # [B, C]
        rank = chunks.argsort(-1).argsort(-1).float()  # 0 = worst chunk
        token_rank = rank.repeat_interleave(c, dim=-1)[:, :n]
        offset = torch.arange(n, device=base.device) % c
        tie_break = 0.5 * (1.0 - offset.float() / c)
        return (token_rank + tie_break).unsqueeze(1).expand(b, h, n).contiguous()
