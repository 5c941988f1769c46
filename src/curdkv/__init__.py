"""curdkv: KV-cache compression for Hugging Face transformers causal LMs.

Core method: CurDKV (Sengupta, Chaudhary, Chakraborty 2025, arXiv 2509.15038),
value-guided token selection by CUR leverage scores, with the baselines the
paper compares against.
"""

from .cache.dense import CompressedCache, CompressedLayer, cache_nbytes
from .cache.masked import MaskedLayer
from .cache.ragged import RaggedLayer
from .context import CompressedContext, prefill, prefill_capture
from .models import DEFAULT_MODEL, load_model
from .presses import (
    PRESSES,
    AdaCurDKV,
    AdaKV,
    AdaSnapKV,
    ChunkKVPress,
    CurDKVPress,
    KNormPress,
    Press,
    RandomPress,
    ScoringView,
    SnapKVPress,
    StreamingLLMPress,
    get_press,
)
from .runtime.capture import PrefillCapture, capture_prefill
from .runtime.hooks import compress

__version__ = "0.1.0"

__all__ = [
    "AdaKV",
    "AdaCurDKV",
    "AdaSnapKV",
    "RaggedLayer",
    "MaskedLayer",
    "CompressedCache",
    "CompressedLayer",
    "CompressedContext",
    "PrefillCapture",
    "Press",
    "ScoringView",
    "CurDKVPress",
    "SnapKVPress",
    "ChunkKVPress",
    "KNormPress",
    "StreamingLLMPress",
    "RandomPress",
    "PRESSES",
    "get_press",
    "compress",
    "capture_prefill",
    "prefill",
    "prefill_capture",
    "cache_nbytes",
    "load_model",
    "DEFAULT_MODEL",
]
