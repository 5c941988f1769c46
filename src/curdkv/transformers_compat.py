"""Where curdkv meets transformers across releases.

curdkv supports the releases in :data:`TESTED_TRANSFORMERS` (``make compat``
runs the core suites under each). Between them transformers renamed the
forward keyword of the cache: up to 5.23 every forward takes
``past_key_values=``; from 5.24 they take ``cache=`` (the old name is
accepted with a ``FutureWarning`` until 5.40), decoder layers hand the cache
to attention as ``cache=``, and outputs carry it as ``.cache``.

So nothing in curdkv looks the cache up by keyword. Hooks find it by its
type among a forward's arguments (:func:`find_cache`): every release must
hand the attention module the ``Cache`` object whose ``update`` it calls,
whatever the argument is named. curdkv's own forward calls ask the model's
signature which keyword it takes (:func:`forward_with_cache`), and outputs
curdkv builds itself name the cache as the release does (:func:`causal_lm_output`).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping

import transformers
from transformers import Cache

TRANSFORMERS_VERSION: str = transformers.__version__

# The oldest and newest releases the test suites ran under (pyproject pins this range).
TESTED_TRANSFORMERS = ("5.17.0", "5.24.0")

_CACHE_KEYWORDS = ("cache", "past_key_values")


def find_cache(*sources) -> Cache | None:
    """The first transformers ``Cache`` among ``sources`` (tuples of arguments, keyword dicts, model outputs)."""
    for source in sources:
        values = source.values() if isinstance(source, Mapping) else source
        for value in values or ():
            if isinstance(value, Cache):
                return value
    return None


@functools.lru_cache(maxsize=None)
def _cache_keyword_of(forward_type) -> str:
    parameters = inspect.signature(forward_type.forward).parameters
    for name in _CACHE_KEYWORDS:
        if name in parameters:
            return name
    raise RuntimeError(
        f"{forward_type.__name__}.forward takes none of the cache keywords {list(_CACHE_KEYWORDS)} "
        f"under transformers {TRANSFORMERS_VERSION}; curdkv is tested with transformers "
        f"{TESTED_TRANSFORMERS[0]} to {TESTED_TRANSFORMERS[1]}"
    )


def cache_keyword(model) -> str:
    """The keyword under which ``model.forward`` takes its cache in this transformers release."""
    return _cache_keyword_of(type(model))


def forward_with_cache(model, cache, **kwargs):
    """``model(**kwargs)`` with ``cache`` passed under the keyword this release expects."""
    return model(**kwargs, **{cache_keyword(model): cache})


def causal_lm_output(logits, cache):
    """A ``CausalLMOutputWithPast`` carrying ``cache`` under this release's field (``cache`` from 5.24, else
    ``past_key_values``), for forwards curdkv serves itself (graph-replayed decode steps)."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    field = next(name for name in _CACHE_KEYWORDS if name in CausalLMOutputWithPast.__dataclass_fields__)
    return CausalLMOutputWithPast(logits=logits, **{field: cache})
