"""curdkv: KV-cache compression for Hugging Face transformers causal LMs.

Core method: CurDKV (Sengupta, Chaudhary, Chakraborty 2025, arXiv 2509.15038),
value-guided token selection by CUR leverage scores, with the baselines the
paper compares against and the related methods of the field.

The public API: every press, :func:`prefill` and :meth:`CompressedContext.ask`
(query-agnostic answering), :func:`compress` (any ``model(...)`` or
``generate`` call), :func:`capture_prefill` (one prefill, many compressed
caches), and the cache types they produce.
"""

from .cache.dense import CompressedCache, CompressedLayer, cache_nbytes
from .cache.masked import MaskedLayer
from .cache.ragged import RaggedLayer
from .context import CompressedContext, ask_many, capture_prefill, prefill
from .context import prefill_capture as prefill_capture  # deprecated, warns when called
from .models import DEFAULT_MODEL, load_model
from . import presses
from .presses import *  # noqa: F403  (every press, the registry and get_press: presses.__all__)
from .presses.adakv import deprecated_name
from .runtime.capture import PrefillCapture
from .runtime.hooks import compress

__version__ = "0.1.0"

__all__ = [
    # prefilling, compressing, asking
    "prefill",
    "CompressedContext",
    "ask_many",
    "compress",
    "capture_prefill",
    "PrefillCapture",
    # what they produce
    "CompressedCache",
    "CompressedLayer",
    "RaggedLayer",
    "MaskedLayer",
    "cache_nbytes",
    # models
    "load_model",
    "DEFAULT_MODEL",
    # every press, and the registry (PRESSES, get_press, parse_press_spec)
    *presses.__all__,
]


def __getattr__(name: str):
    return deprecated_name(__name__, name)
