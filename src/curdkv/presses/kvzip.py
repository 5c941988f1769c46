"""KVzip: keep the tokens the model attends to when asked to repeat its context."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..selection import check_budget, kept_count, shared_threshold_keeps
from .base import Press, ScoringView, check_int

# The reconstruction prompts of the paper's code, before a chunk (the first, and the later ones,
# which also get the previous chunk's last tokens as the words to start from).
FIRST_PROMPT = "\n\nRepeat the previous context exactly."
LATER_PROMPT = "\n\nRepeat the part of the previous context exactly, starting with"


@dataclass
class KVzipPress(Press):
    """KVzip (Kim et al. 2025, "KVzip: Query-Agnostic KV Cache Compression with Context
    Reconstruction", arXiv 2505.23416; code snu-mllab/KVzip).

    A token matters if the model needs it to reproduce the context. After the
    prefill, the context is cut into chunks of ``chunk_size`` tokens; for each,
    the model reads a prompt asking it to repeat the context (from the
    previous chunk's last ``previous_tail`` tokens on), the chat template's
    answer prefix and then the chunk itself, teacher-forced, over the full
    cache. At every layer, each of those queries attends over the sinks, the
    chunk's cached keys and the reconstruction's own keys (causally); a cached
    token's score is the largest attention it receives from any query of any
    head of its GQA group (:meth:`chunk_scores`). That costs about two more
    prefills, which is why the paper's scores beat single-pass presses.

    The scores share one scale across heads and layers, so by default the
    budget is spread over both (``layerwise=False``): every layer and head keeps
    the tokens above one threshold over the whole model, and each layer's
    share is what its heads hold above it. ``layerwise=True`` gives each layer
    the same share, still spread over its heads. The cache is ragged, so what
    a head evicts is freed.

    Differences from the paper's code: the chunks cover the whole encoded
    context, chat prefix included (the code skips the prefix; here its first
    ``num_sinks`` tokens are protected and the rest is scored like any
    token); the runtime (:mod:`curdkv.runtime.reconstruction`) runs the
    passes through curdkv's attention function and scores each layer as the
    pass goes, so no attention matrix over the whole context is formed; the
    global budget is rounded to whole tokens per head at each layer (the mean
    over its heads).
    """

    chunk_size: int = 2048
    num_sinks: int = 4
    previous_tail: int = 8
    layerwise: bool = False

    scores_comparable_across_heads = True
    head_adaptive = True
    alpha = 0.0  # no per-head safeguard: the paper's selection is a plain top-k over heads
    needs_full_prefill = True
    reconstructs_context = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("chunk_size", self.chunk_size, 1)
        check_int("num_sinks", self.num_sinks, 0)
        check_int("previous_tail", self.previous_tail, 0)
        if not isinstance(self.layerwise, bool):
            raise ValueError(f"layerwise must be True or False, got {self.layerwise!r}")

    @property
    def name(self) -> str:
        return "kvzip"

    @property
    def protected_sinks(self) -> int:
        return self.num_sinks

    @staticmethod
    def chunk_scores(queries: torch.Tensor, sink_keys: torch.Tensor, chunk_keys: torch.Tensor,
                     own_keys: torch.Tensor, scaling: float) -> torch.Tensor:
        """The score of each chunk token at one layer: float32 ``[B, H_kv, C]``.

        ``queries`` ``[B, H, q, D]``: the reconstruction pass's post-RoPE
        queries; ``sink_keys`` ``[B, H_kv, s, D]``, ``chunk_keys``
        ``[B, H_kv, C, D]``: the cached keys of the sinks and of the chunk;
        ``own_keys`` ``[B, H_kv, q, D]``: the pass's own keys, seen causally.
        Each query's softmax runs over these keys only; a chunk token's score
        is its largest probability over the queries and the group's heads.
        """
        b, h, q, d = queries.shape
        h_kv = chunk_keys.shape[1]
        group = h // h_kv
        keys = torch.cat([sink_keys, chunk_keys, own_keys], dim=2).float()  # [B, H_kv, s + C + q, D]
        logits = torch.matmul(queries.float().reshape(b, h_kv, group * q, d) * scaling, keys.transpose(-1, -2))
        logits = logits.view(b, h_kv, group, q, -1)
        # The pass's own keys: query i sees its keys 0..i.
        future = torch.ones(q, q, dtype=torch.bool, device=keys.device).triu_(1)
        logits[..., -q:].masked_fill_(future, float("-inf"))
        s, c = sink_keys.shape[2], chunk_keys.shape[2]
        probs = logits.softmax(dim=-1)[..., s : s + c]
        return probs.amax(dim=(2, 3))

    def reconstruction_chunking(self) -> tuple[int, int]:
        return self.chunk_size, self.previous_tail

    def reconstruction_state(self, batch, kv_heads, seq_len, head_dim, device) -> torch.Tensor:
        return torch.zeros(batch, kv_heads, seq_len, dtype=torch.float32, device=device)

    def absorb_chunk(self, state, queries, sink_keys, chunk_keys, own_keys, start, scaling) -> None:
        state[:, :, start : start + chunk_keys.shape[2]] = self.chunk_scores(queries, sink_keys, chunk_keys,
                                                                             own_keys, scaling)

    def score(self, view: ScoringView) -> torch.Tensor:
        if view.reconstruction is None:
            raise ValueError(
                "kvzip scores come from reconstructing the context, which the runtime runs (curdkv.compress with "
                "a tokenizer, curdkv.prefill or curdkv.capture_prefill with text and its tokenizer); the view has none"
            )
        return view.reconstruction

    def layer_keeps(self, scores: list[torch.Tensor], seq_len: int) -> list[int]:
        n_keep = kept_count(seq_len, self.compression_ratio)
        check_budget(seq_len, n_keep, self.protected_sinks, self.protected_recent)
        if self.layerwise:
            return [n_keep] * len(scores)
        return shared_threshold_keeps(scores, n_keep, seq_len, self.num_sinks)
