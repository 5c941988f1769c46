"""StreamingLLM: attention sinks plus the most recent tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Press, ScoringView, check_int


@dataclass
class StreamingLLMPress(Press):
    """StreamingLLM (Xiao et al. 2023, arXiv 2309.17453).

    Keeps the first ``num_sinks`` tokens (attention sinks) and fills the rest
    of the budget with the most recent tokens. Differences from the paper: it
    is applied once to the prefilled context (not as a rolling cache while
    decoding) and positions are not re-assigned inside the cache; RoPE
    positions continue after the original context.
    """

    num_sinks: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("num_sinks", self.num_sinks, 0)

    @property
    def name(self) -> str:
        return "streamingllm"

    @property
    def protected_sinks(self) -> int:
        return self.num_sinks

    def score(self, view: ScoringView) -> torch.Tensor:
        b, h, n = view.keys.shape[:3]
        pos = torch.arange(n, device=view.keys.device, dtype=torch.float32)
        return pos.expand(b, h, n).clone()
