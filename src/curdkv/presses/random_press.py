"""Random eviction: the floor every scoring rule must beat."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Press, ScoringView, check_int


@dataclass
class RandomPress(Press):
    """Uniformly random scores (a control, no paper). Seeded per layer so runs repeat."""

    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("seed", self.seed, 0)

    @property
    def name(self) -> str:
        return "random"

    def score(self, view: ScoringView) -> torch.Tensor:
        gen = torch.Generator(device="cpu").manual_seed(self.seed * 1_000_003 + view.layer_idx)
        return torch.rand(view.keys.shape[:3], generator=gen).to(view.keys.device)
