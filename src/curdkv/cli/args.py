"""The argument types every ``curdkv`` command shares, and the default press lists."""

from __future__ import annotations

import argparse

from ..presses import PRESSES, parse_press_spec

EVAL_PRESSES = "curdkv,adacurdkv,snapkv,adasnapkv,chunkkv,knorm,streamingllm"
# The demo's rows: the paper's estimator beside the exact one, and the baselines a user knows.
DEMO_PRESSES = ("full", "curdkv", "curdkv-sketch", "snapkv", "knorm", "streamingllm")


def ratios(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--ratios must be comma-separated numbers in [0, 1), got {text!r}")
    if not values or any(not 0.0 <= v < 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"--ratios must be comma-separated numbers in [0, 1), got {text!r}")
    return values


def presses(text: str) -> tuple[str, ...]:
    """Comma-separated press specs: registry names, optionally with ``:option=value`` pairs."""
    specs = tuple(t.strip() for t in text.split(",") if t.strip())
    if not specs:
        raise argparse.ArgumentTypeError(f"--presses must name at least one of {sorted({'full', *PRESSES})}")
    for spec in specs:
        if spec.lower() == "full":
            continue
        try:
            # A calibrated configuration is labelled PRESS@calibrated:TOL in a run's records.
            parse_press_spec(spec.split("@calibrated:")[0])
        except ValueError as error:
            raise argparse.ArgumentTypeError(f"--presses: {error}")
    return tuple("full" if s.lower() == "full" else s for s in specs)


def eval_ratios(text: str) -> tuple[float | str, ...]:
    """Ratios in (0, 1), and ``calibrated:TOL`` for presses that choose their ratio per context."""
    from ..eval.sweep import parse_ratio

    values = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        try:
            ratio, tolerance = parse_ratio(item)
        except ValueError as error:
            raise argparse.ArgumentTypeError(f"--{error} (the full cache is always run)")
        values.append(item if tolerance is not None else ratio)
    if not values:
        raise argparse.ArgumentTypeError(f"--ratios must name at least one ratio, got {text!r}")
    return tuple(values)


def grid(text: str) -> tuple[tuple[str, ...], tuple[float, ...]]:
    """``PRESSES@RATIOS``, e.g. ``curdkv:leverage=key,curdkv:leverage=value@0.5,0.9``."""
    press_text, sep, ratio_text = text.rpartition("@")
    if not sep:
        raise argparse.ArgumentTypeError(f"--extra must look like PRESSES@RATIOS, got {text!r}")
    return presses(press_text), eval_ratios(ratio_text)


def lengths(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        values = ()
    if not values or any(v < 256 for v in values):
        raise argparse.ArgumentTypeError(f"--lengths must be comma-separated integers >= 256, got {text!r}")
    return values


def names(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value
