"""ExpectedAttention: keep the tokens that future queries are expected to attend to."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import ALL_QUERIES, Press, ScoringView, check_float, check_int
from .rope import average_rotation, unrotate


@dataclass
class ExpectedAttentionPress(Press):
    """Expected attention (Devoto, Jeblick, Jégou 2025, "Expected Attention: KV Cache
    Compression by Estimating Attention from Future Queries Distribution", arXiv 2510.00636).

    Future queries are modelled as a Gaussian. Its mean ``mu`` and covariance
    ``Sigma`` are those of the context's pre-RoPE queries (the first
    ``num_sinks`` tokens, whose queries are outliers, left out), moved to the
    next ``future_positions`` positions by RoPE's average rotation ``R``. A
    key's expected attention logit is then
    ``s * (R mu) . k + s^2 / 2 * k^T (R Sigma R^T) k`` (``s`` the attention
    scaling: the moment-generating function of a Gaussian), softmaxed per
    query head over the context's tokens after the sinks, averaged over the
    GQA group, and multiplied by the value's norm (``use_value_norm``), since
    a token contributes to the output in proportion to it:
    ``(p + epsilon) * ||v||``.

    The sinks are left out of the softmax, as in the paper's reference
    implementation (kvpress's ``ExpectedAttentionPress``): they are kept
    whatever their score, and with them in the normaliser every other token's
    probability in a query head shrinks by that head's sink mass. A head
    whose sinks draw nearly all the attention (common: attention sinks) then
    counted for almost nothing in the GQA average, and its tokens ranked low
    against other heads' under head-adaptive budgets (``AdaKVPress``). The
    sinks' own scores are each head's highest score.

    Differences from kvpress: the query statistics come from the recorded
    post-RoPE queries of every context token, un-rotated with the model's own
    RoPE (:func:`curdkv.presses.rope.unrotate`), rather than from projecting
    the hidden states with ``q_proj`` again (the same pre-RoPE queries, after
    ``q_norm`` where the model has one, with no projection recomputed). The
    sinks are protected by the shared selection instead of being padded with
    the layer's maximum score plus one. The statistics and the scores are
    computed in float32, whatever the cache's dtype.
    """

    future_positions: int = 512
    num_sinks: int = 4
    use_covariance: bool = True
    use_value_norm: bool = True
    epsilon: float = 0.0

    # Probabilities times value norms: the same units for every head (kvpress pairs it with AdaKV too).
    scores_comparable_across_heads = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("future_positions", self.future_positions, 1)
        check_int("num_sinks", self.num_sinks, 0)
        check_float("epsilon", self.epsilon, 0.0)
        for flag in ("use_covariance", "use_value_norm"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag} must be True or False, got {getattr(self, flag)!r}")

    @property
    def name(self) -> str:
        return "expectedattention"

    @property
    def protected_sinks(self) -> int:
        return self.num_sinks

    @property
    def query_window(self) -> int:
        return ALL_QUERIES

    def query_statistics(self, view: ScoringView) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Mean ``[B, H, D]`` and covariance ``[B, H, D, D]`` (or ``None``) of the rotated future queries."""
        if view.queries is None:
            raise ValueError("expectedattention reads the context's queries; the view has none")
        if view.positions is not None:
            raise ValueError("expectedattention models the queries of a first prefill; it cannot re-score a cache "
                             "during decoding (max_cache_tokens)")
        n, w = view.seq_len, view.queries.shape[2]
        start = n - w  # the recorded queries are those of the last w context tokens
        queries = unrotate(view.queries, view.module, start=start)[:, :, max(0, self.num_sinks - start):]
        if queries.shape[2] == 0:
            raise ValueError(f"expectedattention needs context queries after the {self.num_sinks} sinks; got none")
        mean = queries.mean(dim=2)
        rotation = average_rotation(view.module, torch.arange(n, n + self.future_positions, device=mean.device),
                                    queries.shape[-1])
        rotated_mean = mean @ rotation.T
        if not self.use_covariance:
            return rotated_mean, None
        centred = queries - mean[:, :, None]
        covariance = centred.transpose(-1, -2) @ centred / queries.shape[2]
        return rotated_mean, rotation @ covariance @ rotation.T

    def score(self, view: ScoringView) -> torch.Tensor:
        mean, covariance = self.query_statistics(view)
        b, h, d = mean.shape
        h_kv = view.num_kv_heads
        if h % h_kv:
            raise ValueError(f"{h} query heads cannot share {h_kv} KV heads evenly")
        group = h // h_kv
        s = view.scaling
        n = view.seq_len
        first = min(self.num_sinks, n)  # the sinks are kept anyway: they take no share of the softmax
        scores = torch.empty(b, h_kv, n, dtype=torch.float32, device=mean.device)
        for j in range(h_kv):  # one KV head at a time: the [G, N, D] products stay small at any length
            keys = view.keys[:, j, first:].float()  # [B, N - sinks, D]
            heads = slice(j * group, (j + 1) * group)
            logits = s * torch.einsum("bgd,bnd->bgn", mean[:, heads], keys)
            if covariance is not None:
                spread = torch.einsum("bnd,bgde->bgne", keys, covariance[:, heads])
                logits += s * s / 2 * (spread * keys[:, None]).sum(-1)
            scores[:, j, first:] = logits.softmax(dim=-1).mean(dim=1)
        if self.use_value_norm:
            scores[..., first:] = (scores[..., first:] + self.epsilon) * torch.linalg.vector_norm(
                view.values[:, :, first:], dim=-1, dtype=torch.float32)
        if first:  # query_statistics refused a context of sinks alone
            scores[..., :first] = scores[..., first:].amax(dim=-1, keepdim=True)
        return scores
