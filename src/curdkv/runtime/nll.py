"""Likelihoods under the model: what context-calibrated compression reads.
The calibration's numbers (:mod:`curdkv.presses.calibration`) are fitted to
and predicted from likelihoods that only running the model gives: the
context's own NLL (:func:`context_nll`) and how much compression raises an
answer's NLL (:func:`curdkv.eval.calibration.nll_ratio`). They live here, beside the runtime, so that
presses never run the model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def check_ids(name: str, ids, batch: int | None = None) -> None:
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty [batch, seq_len] tensor of token ids")
    if batch is not None and ids.shape[0] != batch:
        raise ValueError(f"{name} must have the batch size {batch} of the context, got {ids.shape[0]}")


def _token_nll_sums(model, hidden: torch.Tensor, targets: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Summed NLL of ``targets`` ``[B, T]`` from the final hidden states ``[B, T, d]`` predicting them."""
    head = model.get_output_embeddings()
    total = torch.zeros(targets.shape[0], dtype=torch.float64, device=targets.device)
    # The logits of a long context would not fit at once (N x vocabulary); a block at a time.
    for s in range(0, targets.shape[1], chunk):
        logits = head(hidden[:, s : s + chunk]).float()
        nll = F.cross_entropy(logits.transpose(1, 2), targets[:, s : s + chunk], reduction="none")
        total += nll.double().sum(-1)
    return total


@torch.no_grad()
def context_nll_from_hidden(model, hidden: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Token-averaged NLL of each context, float64 ``[B]``, from the decoder's final hidden states.

    ``hidden`` ``[B, N, d]``: the output of ``model.get_decoder()`` (after its
    final norm) for ``input_ids`` ``[B, N]``, e.g. caught by a forward hook
    during the one prefill, so the NLL costs no second pass and the N x
    vocabulary logits never exist at once (they go through the LM head a
    block at a time).
    """
    check_ids("input_ids", input_ids)
    if input_ids.shape[1] < 2:
        raise ValueError("the context NLL needs at least 2 tokens (the first one is never predicted)")
    if hidden.dim() != 3 or tuple(hidden.shape[:2]) != tuple(input_ids.shape):
        raise ValueError(f"hidden must be [B, N, d] for input_ids {tuple(input_ids.shape)}, got {tuple(hidden.shape)}")
    return _token_nll_sums(model, hidden[:, :-1], input_ids[:, 1:]) / (input_ids.shape[1] - 1)


@torch.no_grad()
def context_nll(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Token-averaged NLL of each context under ``model``: float64 ``[B]`` (the paper's ``NLL(c)``).

    One forward pass of the decoder without cache; each token after the first
    is predicted from those before it, as in the model's own LM loss.
    """
    check_ids("input_ids", input_ids)
    if input_ids.shape[1] < 2:
        raise ValueError("the context NLL needs at least 2 tokens (the first one is never predicted)")
    hidden = model.get_decoder()(input_ids=input_ids, use_cache=False).last_hidden_state
    return context_nll_from_hidden(model, hidden, input_ids)


