"""Sizing a generated sample to a token budget: the one search RULER's samples and task parts share."""

from __future__ import annotations

from collections.abc import Callable


def fit_size(measure: Callable[[int], int], budget: int, lo: int, hi: int,
             guess: int | None = None, unit: float = 1.0) -> tuple[int | None, int | None]:
    """Largest ``size`` in [lo, hi] with ``measure(size) <= budget``, and its measure.

    ``measure`` (a token count) grows roughly linearly with ``size``; the
    search interpolates between measured points (secant), bisecting when
    that stops halving the bracket, so a good ``guess`` (the previous
    sample's size) needs about three measurements. ``unit`` is a rough
    measure per size step, used to place the first probe when there is no
    guess. Returns ``(None, measure(lo))`` when not even ``lo`` fits.
    """
    seen: dict[int, int] = {}

    def m(size: int) -> int:
        if size not in seen:
            seen[size] = measure(size)
        return seen[size]

    if lo > hi:
        return None, None
    if m(lo) > budget:
        return None, seen[lo]
    good, bad = lo, hi + 1  # good fits; bad (if <= hi) does not
    cand = guess if guess is not None else lo + int((budget - seen[lo]) / max(unit, 1e-9))
    prev_good, bisect_next = lo, False
    while bad - good > 1:
        if bisect_next:
            cand = (good + bad) // 2
        cand = min(max(cand, good + 1), bad - 1)
        width = bad - good
        if m(cand) <= budget:
            prev_good, good = good, cand
        else:
            bad = cand
        if bad - good <= 1:
            break
        bisect_next = bad <= hi and (bad - good) * 2 > width
        if bad <= hi:  # bracketed: interpolate between the two ends
            slope = (seen[bad] - seen[good]) / (bad - good)
            cand = good + int((budget - seen[good]) / slope) if slope > 0 else (good + bad) // 2
        else:  # only fitting points so far: extrapolate one step past the estimate, to bracket it
            slope = (seen[good] - seen[prev_good]) / (good - prev_good) if good > prev_good else unit
            step = int((budget - seen[good]) / slope) + 1 if slope > 0 else 2 * (good - prev_good)
            cand = good + max(step, 1)
    return good, seen[good]
