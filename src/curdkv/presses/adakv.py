"""Head-adaptive budgets for any press whose scores compare across heads."""

from __future__ import annotations

from .base import Press, ScoringView
from .chunkkv import ChunkKVPress
from .curdkv import CurDKVPress
from .snapkv import SnapKVPress


class AdaKV(Press):
    """AdaKV (Feng et al. 2024, arXiv 2407.11550), in the form the CurDKV paper uses.

    Wraps ``press`` and keeps its scores, but instead of every KV head
    keeping the same ``k`` tokens, the layer's budget ``H_kv * k`` (per batch
    element) is shared: each head first keeps its own top ``floor(alpha * k)``
    (a safeguard so no head is starved), then the rest of the budget goes to
    the highest remaining scores over all heads of the layer. The wrapped
    press's protected tokens (sinks, observation window) are always kept.

    Ranking scores of different heads against each other needs scores on a
    common scale, which each press declares through
    ``scores_comparable_across_heads`` (CurDKV's are per-head distributions,
    SnapKV's are averaged softmax attention); other presses are refused.

    Unlike kvpress's ``AdaKVPress``, which keeps every entry and hides the
    evicted ones from attention, the cache holds only what each head kept (a
    ragged layout), so the memory saved equals a uniform press's at the same
    ratio. Difference from the paper: AdaKV's original safeguard is expressed
    over the whole layer budget; here ``alpha`` scales the per-head budget as in
    the CurDKV paper's adaptive variants (same thing, per head).
    """

    head_adaptive = True

    def __init__(self, press: Press, alpha: float = 0.2):
        if not isinstance(press, Press):
            raise TypeError(f"press must be a curdkv Press (e.g. curdkv.CurDKVPress()), got {type(press).__name__}")
        if isinstance(press, (AdaKV, ChunkKVPress)):
            raise ValueError(
                f"press must score single tokens; {type(press).__name__} cannot be made head-adaptive "
                "(AdaKV is already adaptive; ChunkKV keeps whole chunks for every head)"
            )
        if not press.scores_comparable_across_heads:
            raise ValueError(
                f"press must have scores comparable across heads for AdaKV; {type(press).__name__}'s are not "
                "(use CurDKVPress or SnapKVPress)"
            )
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be a float in [0, 1], got {alpha!r}")
        self.press = press
        self.alpha = float(alpha)

    @property
    def compression_ratio(self) -> float:  # type: ignore[override]
        return self.press.compression_ratio

    @property
    def name(self) -> str:
        return "ada" + self.press.name

    scores_comparable_across_heads = True

    @property
    def protected_sinks(self) -> int:
        return self.press.protected_sinks

    @property
    def protected_recent(self) -> int:
        return self.press.protected_recent

    @property
    def query_window(self) -> int:
        return self.press.query_window

    @property
    def needs_full_prefill(self) -> bool:  # type: ignore[override]
        return self.press.needs_full_prefill

    @property
    def lookahead_tokens(self) -> int:
        return self.press.lookahead_tokens

    @property
    def scores_depend_on_ratio(self) -> bool:  # type: ignore[override]
        return self.press.scores_depend_on_ratio

    def score(self, view: ScoringView):
        return self.press.score(view)

    def layer_keep(self, seq_len: int, layer_idx: int, num_layers: int) -> int:
        return self.press.layer_keep(seq_len, layer_idx, num_layers)

    def layer_keeps(self, scores, seq_len: int) -> list[int]:
        return self.press.layer_keeps(scores, seq_len)

    def with_ratio(self, compression_ratio: float) -> "AdaKV":
        clone = object.__new__(type(self))
        AdaKV.__init__(clone, self.press.with_ratio(compression_ratio), self.alpha)
        return clone

    def describe(self) -> str:
        return f"{type(self).__name__}(press={self.press.describe()}, alpha={self.alpha!r})"

    __repr__ = describe

    def __eq__(self, other) -> bool:
        return type(other) is type(self) and other.press == self.press and other.alpha == self.alpha

    __hash__ = None  # mutable, like the dataclass presses


class AdaCurDKV(AdaKV):
    """AdaCurDKV (arXiv 2509.15038): CurDKV's leverage scores with AdaKV budgets.

    ``AdaCurDKV(compression_ratio=0.5, alpha=0.2, **curdkv_options)``; any
    :class:`CurDKVPress` option (``estimator``, ``leverage``...) passes through.
    """

    def __init__(self, compression_ratio: float = 0.0, alpha: float = 0.2, **curdkv_options):
        super().__init__(CurDKVPress(compression_ratio=compression_ratio, **curdkv_options), alpha)


class AdaSnapKV(AdaKV):
    """AdaSnapKV (AdaKV arXiv 2407.11550 over SnapKV arXiv 2404.14469), the CurDKV paper's adaptive baseline."""

    def __init__(self, compression_ratio: float = 0.0, alpha: float = 0.2, **snapkv_options):
        super().__init__(SnapKVPress(compression_ratio=compression_ratio, **snapkv_options), alpha)
