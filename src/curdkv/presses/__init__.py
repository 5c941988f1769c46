"""Scoring rules, one file per method, and a registry of them by name."""

from __future__ import annotations

from typing import Callable

from .adakv import AdaCurDKVPress, AdaKVPress, AdaSnapKVPress, deprecated_name
from .base import Press, ScoringView, WrapperPress
from .chunkkv import ChunkKVPress
from .compactor import CompactorPress
from .curdkv import CurDKVPress
from .expected_attention import ExpectedAttentionPress
from .h2o import H2OPress
from .keydiff import KeyDiffPress
from .knorm import KNormPress
from .kvzip import KVzipPress
from .lava import LAVaPress
from .lookahead_qcache import LookaheadQCachePress
from .morphkv import MorphKVPress
from .obcache import OBCachePress
from .pyramidkv import PyramidKVPress
from .random_press import RandomPress
from .snapkv import SnapKVPress
from .streaming_llm import StreamingLLMPress
from .window import WindowPress

PRESSES: dict[str, Callable[..., Press]] = {
    "curdkv": CurDKVPress,
    "curdkv-sketch": lambda **kw: CurDKVPress(estimator="projection", **kw),
    "curdkv-post-rope": lambda **kw: CurDKVPress(key_space="post_rope", centre=False, **kw),
    "snapkv": SnapKVPress,
    "chunkkv": ChunkKVPress,
    "knorm": KNormPress,
    "streamingllm": StreamingLLMPress,
    "random": RandomPress,
    "adacurdkv": AdaCurDKVPress,
    "adacurdkv-sketch": lambda **kw: AdaCurDKVPress(estimator="projection", **kw),
    "adacurdkv-post-rope": lambda **kw: AdaCurDKVPress(key_space="post_rope", centre=False, **kw),
    "adasnapkv": AdaSnapKVPress,
    "pyramidkv": PyramidKVPress,
    "lava": LAVaPress,
    "lookahead": LookaheadQCachePress,
    "morphkv": MorphKVPress,
    "obcache": OBCachePress,
    "adaobcache": lambda alpha=0.2, **kw: AdaKVPress(OBCachePress(**kw), alpha),
    "h2o": H2OPress,
    "compactor": CompactorPress,
    "adacompactor": lambda alpha=0.2, **kw: AdaKVPress(CompactorPress(**kw), alpha),
    "expectedattention": ExpectedAttentionPress,
    "adaexpectedattention": lambda alpha=0.2, **kw: AdaKVPress(ExpectedAttentionPress(**kw), alpha),
    "keydiff": KeyDiffPress,
    "kvzip": KVzipPress,
    "kvzip-layerwise": lambda **kw: KVzipPress(layerwise=True, **kw),
}


def _option_value(text: str):
    """``none`` -> None, integers and floats as numbers, ``true``/``false`` as booleans, else the text."""
    lowered = text.lower()
    if lowered == "none":
        return None
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_press_spec(spec: str) -> tuple[str, dict]:
    """Split ``"curdkv:leverage=key:local_window=16"`` into ``("curdkv", {"leverage": "key", "local_window": 16})``.

    A spec is a registry name, optionally followed by ``:option=value`` pairs
    passed to the press's constructor (``none`` for None). It names one
    configuration in sweeps and on the command line, where commas separate specs.
    The compression ratio is not an option: it comes from the ratio argument
    (``--ratios`` on the command line), so one spec runs at every ratio.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"press must be a non-empty string, got {spec!r}")
    name, *options = spec.strip().split(":")
    key = name.lower()
    if key not in PRESSES:
        raise ValueError(f"press must be one of {sorted(PRESSES)}, got {name!r} (in {spec!r})")
    kwargs = {}
    for option in options:
        field, sep, value = option.partition("=")
        if not sep or not field or not value:
            raise ValueError(f"press options must look like name:option=value[:option=value], got {spec!r}")
        if field == "compression_ratio":
            raise ValueError(
                f"press spec {spec!r}: compression_ratio is not a spec option; pass the ratio separately "
                "(get_press(name, ratio), --ratios on the command line)"
            )
        kwargs[field] = _option_value(value)
    return key, kwargs


def get_press(name: str, compression_ratio: float | None = None, /, **options) -> Press:
    """Build a press by registry name or spec, e.g. ``get_press("curdkv", 0.5)``, ``get_press("curdkv:leverage=key", 0.5)``.

    The ratio (default 0) is the second argument or the keyword
    ``compression_ratio``, not both; ``options`` are other constructor
    arguments of the press (they override the spec's).
    """
    key, spec_options = parse_press_spec(name)
    if "compression_ratio" in options:
        if compression_ratio is not None:
            raise ValueError(
                f"get_press({name!r}, ...): compression_ratio given twice ({compression_ratio!r} and "
                f"{options['compression_ratio']!r}); pass it once"
            )
        compression_ratio = options.pop("compression_ratio")
    if compression_ratio is None:
        compression_ratio = 0.0
    spec_options.update(options)
    try:
        return PRESSES[key](compression_ratio=compression_ratio, **spec_options)
    except TypeError as error:  # an option the press does not have
        raise ValueError(f"press {name!r}: {error}") from None


__all__ = [
    "Press",
    "WrapperPress",
    "WindowPress",
    "ScoringView",
    "CurDKVPress",
    "SnapKVPress",
    "ChunkKVPress",
    "KNormPress",
    "StreamingLLMPress",
    "RandomPress",
    "AdaKVPress",
    "AdaCurDKVPress",
    "AdaSnapKVPress",
    "PyramidKVPress",
    "LAVaPress",
    "LookaheadQCachePress",
    "MorphKVPress",
    "OBCachePress",
    "H2OPress",
    "CompactorPress",
    "ExpectedAttentionPress",
    "KeyDiffPress",
    "KVzipPress",
    "PRESSES",
    "get_press",
    "parse_press_spec",
]


def __getattr__(name: str):
    return deprecated_name(__name__, name)
