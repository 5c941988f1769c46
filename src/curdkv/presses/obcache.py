"""OBCache: token saliency as the attention-output error its eviction causes."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import ScoringView, check_choice, check_odd_kernel, pool_scores
from .window import WindowPress, window_hidden, window_logits

SALIENCIES = ("value", "key", "joint")
POOLINGS = (None, "max", "avg")


def window_attention_logits(view: ScoringView, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention and logits of the last ``window`` queries, float32 ``[B, H_kv, G, W, N]``.

    G query heads share each KV head. Window query i sits at position
    ``N - W + i`` and sees keys up to it; ``logits`` are the scaled
    pre-softmax logits, set to 0 where the causal mask hides a key so that
    products with the (zero) attention there stay 0 instead of NaN.
    """
    logits = window_logits(view, window)
    hidden = window_hidden(logits.shape[-1], window, logits.device)  # [W, N]
    attn = logits.masked_fill(hidden, float("-inf")).softmax(-1)
    return attn, logits.masked_fill_(hidden, 0.0)


def output_errors(saliency: str, attn: torch.Tensor, logits: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Per query head, the window's summed squared output error of pruning each token, ``[B, H_kv, G, N]``.

    For window query i and token j, with attention ``A``, logit ``s`` and
    output ``o_i = sum_j A_ij v_j``, the first-order output change of each
    pruning is ``A_ij v_j`` (value), ``A_ij s_ij (v_j - o_i)`` (key) and their
    sum (joint); the score is its squared norm summed over i.
    """
    v_sq = values.square().sum(-1)[:, :, None, None, :]  # [B, H_kv, 1, 1, N]
    a_sq = attn.square()
    if saliency == "value":
        return a_sq.sum(-2) * v_sq[:, :, :, 0]
    # ||v_j - o_i||^2 is expanded through inner products (no [W, N, D] tensor). Values are
    # centred on their mean c first: v_j - o_i is unchanged, but the expansion no longer
    # cancels a large shared component, and o_i - c = sum_j A_ij (v_j - c) as rows sum to 1.
    c = values.mean(-2, keepdim=True)  # [B, H_kv, 1, D]
    vc = values - c
    oc = torch.einsum("bkgwn,bknd->bkgwd", attn, vc)
    vc_sq = vc.square().sum(-1)[:, :, None, None, :]
    voc = torch.einsum("bkgwd,bknd->bkgwn", oc, vc)
    # Each (i, j) term is a squared norm: clamping at 0 only removes round-off.
    dist = (vc_sq + oc.square().sum(-1, keepdim=True) - 2.0 * voc).clamp_min_(0.0)
    err = dist.mul_(logits.square())
    if saliency == "joint":
        # ||v_j + s_ij (v_j - o_i)||^2 = ||v_j||^2 + s_ij^2 ||v_j - o_i||^2 + 2 s_ij <v_j, v_j - o_i>,
        # with <v_j, v_j - o_i> = <vc_j + c, vc_j - oc_i>.
        c_vc = (vc * c).sum(-1)[:, :, None, None, :]
        c_oc = (oc * c[:, :, None]).sum(-1, keepdim=True)
        inner = voc.neg_().add_(vc_sq).add_(c_vc).sub_(c_oc)
        err = err.add_(v_sq).add_(inner.mul_(logits).mul_(2.0)).clamp_min_(0.0)
    return err.mul_(a_sq).sum(-2)


@dataclass
class OBCachePress(WindowPress):
    """OBCache, Optimal Brain Cache (Gu, Liang, Zhao and Diao 2025, arXiv 2510.07651).

    Eviction is treated as layer-wise structured pruning in the spirit of
    Optimal Brain Damage: a token's saliency is the squared perturbation of the
    attention outputs its pruning causes, measured on the observation window
    (the last ``window_size`` context queries, as in SnapKV). With ``A`` the
    causal softmax attention of window query i to token j, ``s_ij`` the
    pre-softmax logit ``scaling * q_i . k_j`` (the module's ``scaling``,
    ``1/sqrt(D)`` for Llama-style models) and ``o_i = sum_j A_ij v_j`` the
    attention output, ``saliency`` (not ``score``, the press's method) picks
    one of the paper's closed forms:

    * ``"value"`` (pruning v_j to 0): ``S_j = sum_i A_ij^2 ||v_j||^2``;
    * ``"key"`` (pruning k_j to 0, so its logit drops from s_ij to 0):
      ``S_j = sum_i (A_ij s_ij)^2 ||v_j - o_i||^2``;
    * ``"joint"`` (both): ``S_j = sum_i A_ij^2 ||v_j||^2 + (A_ij s_ij)^2 ||v_j - o_i||^2
      + 2 A_ij^2 s_ij <v_j, v_j - o_i>``, the value and key scores plus their
      cross term, i.e. ``sum_i A_ij^2 ||v_j + s_ij (v_j - o_i)||^2``.

    ``pooling`` (``None``, ``"max"`` or ``"avg"`` over ``kernel_size`` tokens)
    smooths the scores before ranking; the paper's SnapKV-based variant uses
    max pooling of width 7, its H2O- and TOVA-based variants none. The
    window's own tokens are always kept.

    Scores are squared errors in attention-output space; the layer's total
    error estimate is their sum over every evicted (head, token) pair, so one
    head's scores rank directly against another's and AdaKV may share the
    budget across heads (``scores_comparable_across_heads``).

    Differences from the paper and its released code: (1) the default
    ``saliency`` is ``"value"``, the variant of the authors' usage example
    (their evaluation scripts run all three); (2) GQA: the authors repeat each
    KV head for its query heads and evict per query head; here a KV head's
    score is the sum of its query heads' scores (the squared error of the
    group's concatenated outputs), so the heads of a group keep one set of
    tokens; (3) one-shot compression of the prefilled context with the window
    at its end, not the rolling eviction during decoding that their cache also
    offers; (4) ``window_size`` defaults to 16, the recent window of the
    authors' needle-retrieval runs (their LongBench runs give it 5% of the
    budget); (5) attention, logits and outputs are recomputed in float32 from
    the window queries rather than taken from the model's attention kernel;
    squared distances are expanded through inner products of mean-centred
    values, and each term is clamped at 0 (its true minimum) against round-off.
    """

    window_size: int = 16
    saliency: str = "value"
    pooling: str | None = None
    kernel_size: int = 7

    scores_comparable_across_heads = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("saliency", self.saliency, SALIENCIES)
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {list(POOLINGS)!r}, got {self.pooling!r}")
        check_odd_kernel("kernel_size", self.kernel_size)

    def score(self, view: ScoringView) -> torch.Tensor:
        n, w = self.window_bounds(view)
        attn, logits = window_attention_logits(view, w)
        per_query_head = output_errors(self.saliency, attn, logits, view.values.float())
        per_query_head = pool_scores(per_query_head[..., : n - w].contiguous(), self.pooling, self.kernel_size)
        return self.with_window(per_query_head.sum(2))
