"""Random eviction: the floor every scoring rule must beat."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Press, ScoringView, check_int


@dataclass
class RandomPress(Press):
    """Uniformly random scores (a control, no paper).

    Seeded per layer so runs repeat. Every batch element gets the same draw, so
    what a sequence keeps does not depend on which batch it was run in.
    """

    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("seed", self.seed, 0)

    @property
    def name(self) -> str:
        return "random"

    def score(self, view: ScoringView) -> torch.Tensor:
        gen = torch.Generator(device="cpu").manual_seed(self.seed * 1_000_003 + view.layer_idx)
        b, h, n = view.keys.shape[:3]
        return torch.rand((1, h, n), generator=gen).expand(b, h, n).to(view.keys.device)
