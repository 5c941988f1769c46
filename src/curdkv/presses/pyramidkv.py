"""PyramidKV: SnapKV's scores with budgets that shrink from the lowest layer to the highest."""

from __future__ import annotations

from dataclasses import dataclass

from ..selection import kept_count
from .base import check_int
from .snapkv import SnapKVPress


def pyramid_budgets(seq_len: int, n_keep: int, window: int, num_layers: int, beta: int) -> list[int]:
    """Tokens kept per KV head at each layer, averaging ``n_keep``, window included.

    The tokens outside the window, ``b = n_keep - window`` on average, follow
    an arithmetic sequence from ``2b - b/beta`` at the first layer down to
    ``b/beta`` at the last; when the first layer's share would exceed the
    context outside the window, it is capped there and the last layer's share
    raised to keep the mean. Each layer adds the window back.
    """
    b = n_keep - window
    if num_layers == 1 or b <= 0:
        return [n_keep] * num_layers
    low = b / beta
    high = 2 * b - low
    if high > seq_len - window:
        high = seq_len - window
        low = 2 * b - high
    step = (high - low) / (num_layers - 1)
    return [min(seq_len, window + round(high - layer * step)) for layer in range(num_layers)]


@dataclass
class PyramidKVPress(SnapKVPress):
    """PyramidKV (Cai et al. 2024, arXiv 2406.02069).

    Attention is dense in low layers and concentrated in high ones (the
    paper's "pyramidal information funnelling"), so low layers keep more
    tokens than high ones: the budget outside the observation window falls
    linearly with depth, from ``2b - b/beta`` to ``b/beta`` where ``b`` is its
    mean (:func:`pyramid_budgets`); the average over layers is the uniform
    budget at ``compression_ratio``, so the memory held matches SnapKV's at
    the same ratio (up to rounding). Tokens are scored as in
    :class:`SnapKVPress` (window queries' attention, pooled, averaged over
    the GQA group).

    Differences from the paper and its code (KVCache-Factory): the window is
    counted inside the average budget as in curdkv's other presses; the step
    between layers is not rounded down (the mean is exact up to rounding of
    each layer); scoring uses SnapKVPress's defaults (window 64, average
    pooling of width 5; the authors' LongBench runs use window 8 and max
    pooling of width 7) and one token set per KV head (the authors' code
    selects per query head and stores the cache at query-head width).
    """

    beta: int = 20

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("beta", self.beta, 1)

    def layer_keep(self, seq_len: int, layer_idx: int, num_layers: int) -> int:
        n_keep = kept_count(seq_len, self.compression_ratio)
        return pyramid_budgets(seq_len, n_keep, self.window_size, num_layers, self.beta)[layer_idx]
