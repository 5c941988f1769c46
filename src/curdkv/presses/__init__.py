"""Scoring rules, one file per method, and a registry of them by name."""

from __future__ import annotations

from typing import Callable

from .adakv import AdaCurDKV, AdaKV, AdaSnapKV
from .base import Press, ScoringView
from .chunkkv import ChunkKVPress
from .curdkv import CurDKVPress
from .knorm import KNormPress
from .random_press import RandomPress
from .snapkv import SnapKVPress
from .streaming_llm import StreamingLLMPress

PRESSES: dict[str, Callable[..., Press]] = {
    "curdkv": CurDKVPress,
    "curdkv-exact": lambda **kw: CurDKVPress(estimator="exact", **kw),
    "snapkv": SnapKVPress,
    "chunkkv": ChunkKVPress,
    "knorm": KNormPress,
    "streamingllm": StreamingLLMPress,
    "random": RandomPress,
    "adacurdkv": AdaCurDKV,
    "adacurdkv-exact": lambda **kw: AdaCurDKV(estimator="exact", **kw),
    "adasnapkv": AdaSnapKV,
}


def get_press(name: str, compression_ratio: float = 0.0, **kwargs) -> Press:
    """Build a press by its registry name, e.g. ``get_press("curdkv", 0.5)``."""
    key = name.lower()
    if key not in PRESSES:
        raise ValueError(f"press must be one of {sorted(PRESSES)}, got {name!r}")
    return PRESSES[key](compression_ratio=compression_ratio, **kwargs)


__all__ = [
    "Press",
    "ScoringView",
    "CurDKVPress",
    "SnapKVPress",
    "ChunkKVPress",
    "KNormPress",
    "StreamingLLMPress",
    "RandomPress",
    "AdaKV",
    "AdaCurDKV",
    "AdaSnapKV",
    "PRESSES",
    "get_press",
]
