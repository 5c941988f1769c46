"""KeyDiff: keep the keys that differ most from the layer's average key direction."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import Press, ScoringView


@dataclass
class KeyDiffPress(Press):
    """KeyDiff (Park et al. 2025, "KeyDiff: Key Similarity-Based KV Cache Eviction for
    Long-Context LLM Inference in Resource-Constrained Environments", arXiv 2504.15364).

    A token's score is minus the cosine similarity of its key to the anchor,
    the mean of the head's unit-normalised keys: keys pointing where most keys
    point are redundant, distinctive ones are kept. It needs no queries, so it
    works with attention kernels that never expose attention weights.

    Differences from the paper: the paper evicts block by block as a long
    prompt streams in under a fixed cache budget; here the whole prefill is
    scored at once, so the anchor is the mean over every context token. Keys
    are post-RoPE (as cached), the cosines are computed in float32, and no
    tokens are protected (sinks are kept only if their keys are distinctive,
    which they usually are).
    """

    # Cosines lie in [-1, 1] for every head alike.
    scores_comparable_across_heads = True

    @property
    def name(self) -> str:
        return "keydiff"

    def score(self, view: ScoringView) -> torch.Tensor:
        keys = view.keys.float()
        anchor = F.normalize(keys, dim=-1).mean(dim=2, keepdim=True)
        return -F.cosine_similarity(keys, anchor, dim=-1)
