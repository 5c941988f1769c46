"""Head-adaptive budgets for any press whose scores compare across heads."""

from __future__ import annotations

import warnings

from ..selection import check_alpha
from .base import Press, ScoringView, WrapperPress, check_press
from .chunkkv import ChunkKVPress
from .curdkv import CurDKVPress
from .snapkv import SnapKVPress


class AdaKVPress(WrapperPress):
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
    scores_comparable_across_heads = True
    alpha = 0.2
    own_traits = ("head_adaptive", "scores_comparable_across_heads", "alpha")

    def __init__(self, press: Press, alpha: float = 0.2):
        check_press(press)
        if isinstance(press, (AdaKVPress, ChunkKVPress)):
            raise ValueError(
                f"press must score single tokens; {type(press).__name__} cannot be made head-adaptive "
                "(AdaKVPress is already adaptive; ChunkKV keeps whole chunks for every head)"
            )
        if not press.scores_comparable_across_heads:
            raise ValueError(
                f"press must have scores comparable across heads for AdaKVPress; {type(press).__name__}'s are not "
                "(use CurDKVPress or SnapKVPress)"
            )
        self.press = press
        self.alpha = check_alpha(alpha)

    @property
    def compression_ratio(self) -> float:  # type: ignore[override]
        return self.press.compression_ratio

    @property
    def name(self) -> str:
        return "ada" + self.press.name

    def score(self, view: ScoringView):
        return self.press.score(view)

    def with_ratio(self, compression_ratio: float) -> "AdaKVPress":
        clone = object.__new__(type(self))
        AdaKVPress.__init__(clone, self.press.with_ratio(compression_ratio), self.alpha)
        return clone

    def describe(self) -> str:
        return f"{type(self).__name__}(press={self.press.describe()}, alpha={self.alpha!r})"

    __repr__ = describe

    def __eq__(self, other) -> bool:
        return type(other) is type(self) and other.press == self.press and other.alpha == self.alpha

    __hash__ = None  # mutable, like the dataclass presses


class AdaCurDKVPress(AdaKVPress):
    """AdaCurDKVPress (arXiv 2509.15038): CurDKV's leverage scores with AdaKVPress budgets.

    ``AdaCurDKVPress(compression_ratio=0.5, alpha=0.2, **curdkv_options)``; any
    :class:`CurDKVPress` option (``estimator``, ``leverage``...) passes through.
    """

    def __init__(self, compression_ratio: float = 0.0, alpha: float = 0.2, **curdkv_options):
        super().__init__(CurDKVPress(compression_ratio=compression_ratio, **curdkv_options), alpha)


class AdaSnapKVPress(AdaKVPress):
    """AdaSnapKVPress (AdaKVPress arXiv 2407.11550 over SnapKV arXiv 2404.14469), the CurDKV paper's adaptive baseline."""

    def __init__(self, compression_ratio: float = 0.0, alpha: float = 0.2, **snapkv_options):
        super().__init__(SnapKVPress(compression_ratio=compression_ratio, **snapkv_options), alpha)


# The wrappers' names before they ended in Press like every other press; kept, with a warning,
# for one release.
DEPRECATED_NAMES = {"AdaKV": "AdaKVPress", "AdaCurDKV": "AdaCurDKVPress", "AdaSnapKV": "AdaSnapKVPress"}


def deprecated_name(module: str, name: str):
    """A module ``__getattr__``: the press an old name stood for, with a ``DeprecationWarning``."""
    new = DEPRECATED_NAMES.get(name)
    if new is None:
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    warnings.warn(f"{module}.{name} is deprecated and goes in the next release; use {module}.{new}",
                  DeprecationWarning, stacklevel=3)
    return globals()[new]


def __getattr__(name: str):
    return deprecated_name(__name__, name)
