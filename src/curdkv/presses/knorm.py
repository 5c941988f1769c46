"""KNorm: keep the keys with the smallest L2 norm."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Press, ScoringView


@dataclass
class KNormPress(Press):
    """Key-norm eviction (Devoto et al. 2024, arXiv 2406.11430).

    Keys with a low L2 norm tend to receive high attention, so the score is
    the negated key norm. Differences from the paper: norms of post-RoPE keys
    (RoPE is a rotation, so the norm is the same as pre-RoPE), no layer
    exclusions, no protected tokens.
    """

    scores_comparable_across_heads = False

    @property
    def name(self) -> str:
        return "knorm"

    def score(self, view: ScoringView) -> torch.Tensor:
        # Accumulated in float32 without a float32 copy of the keys: 0.25 against 0.67 ms
        # for a Llama-3.1-8B layer at 128K on an H100, the same values.
        return -torch.linalg.vector_norm(view.keys, dim=-1, dtype=torch.float32)
