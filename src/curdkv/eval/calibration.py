"""Measuring what context-calibrated compression is fitted on: how much a press raises an answer's NLL.

:func:`nll_ratio` compresses a context with a press and compares the NLL of
a true answer with the full cache's; :func:`curdkv.presses.calibration.fit_calibration`
fits a press's curve to such ratios.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from ..cache.dense import CompressedCache
from ..presses.base import Press, check_press
from ..runtime.hooks import compress
from ..runtime.nll import check_ids
from ..transformers_compat import forward_with_cache


def _answer_nll(model, press, context_ids, follow_ids, answer_len: int) -> torch.Tensor:
    cache = CompressedCache()
    with compress(model, press) if press is not None else contextlib.nullcontext():
        first = forward_with_cache(model, cache, input_ids=context_ids, use_cache=True, logits_to_keep=1).logits[:, -1]
    rest = forward_with_cache(model, cache, input_ids=follow_ids, use_cache=True).logits[:, :-1]
    logits = torch.cat([first[:, None], rest], dim=1)[:, -answer_len:].float()
    return F.cross_entropy(logits.transpose(1, 2), follow_ids[:, -answer_len:], reduction="none").double().mean()


@torch.no_grad()
def nll_ratio(model, press: Press, context_ids: torch.Tensor, answer_ids: torch.Tensor, query_ids=None) -> float:
    """The paper's ``g(r, q, c) = NLL(answer | q, c) / NLL(answer | q, c compressed by press)``.

    The context is prefilled (and compressed by ``press``), then the query
    (optional, never compressed) and the answer are fed after it; only the
    answer's tokens are scored, averaged over tokens and batch. This measures
    the training triples of :func:`fit_calibration`.
    """
    check_press(press)
    check_ids("context_ids", context_ids)
    check_ids("answer_ids", answer_ids, context_ids.shape[0])
    follow = answer_ids
    if query_ids is not None:
        check_ids("query_ids", query_ids, context_ids.shape[0])
        follow = torch.cat([query_ids, answer_ids], dim=1)
    full = _answer_nll(model, None, context_ids, follow, answer_ids.shape[1])
    compressed = _answer_nll(model, press, context_ids, follow, answer_ids.shape[1])
    return float(full / compressed)
