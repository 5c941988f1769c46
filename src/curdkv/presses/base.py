"""The press contract: a scoring rule over one layer's cached tokens.

A press answers one question: how important is each cached token of this
layer? It never touches hooks, caches or the model; the runtime hands it a
:class:`ScoringView` and turns the returned scores into kept indices with the
shared selection code (:mod:`curdkv.selection`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from ..selection import check_budget, kept_count


@dataclass
class ScoringView:
    """What a press may read for one layer, all tensors on the model's device.

    keys, values: ``[B, H_kv, N, D]`` post-RoPE, as cached by the model.
    queries: ``[B, H, W, D]`` post-RoPE queries of the last ``W`` context
        tokens (the observation window), or ``None`` when no press asked for them.
    module: the attention module (for ``o_proj``, head counts, scaling).
    layer_idx: index of the layer in the model.
    pseudo_queries: ``[B, H, m, D]`` queries of ``m`` tokens decoded after the
        context (Lookahead Q-Cache), for presses with ``lookahead_tokens``; else ``None``.
    positions: ``[B, H_kv, N]`` RoPE positions of the cached tokens, or
        ``None`` when they are ``0 .. N-1`` (a first prefill). Compression during
        decoding scores caches whose earlier tokens were already evicted.
    reconstruction: what the press gathered (:meth:`Press.absorb_chunk`) while
        the model reconstructed the context, for presses with
        ``reconstructs_context``: KVzip's scores ``[B, H_kv, N]``, CurDKV's query
        Gram ``[B, H_kv, D, D]``; else ``None``.
    """

    keys: torch.Tensor
    values: torch.Tensor
    queries: torch.Tensor | None
    module: nn.Module | None
    layer_idx: int
    positions: torch.Tensor | None = None
    pseudo_queries: torch.Tensor | None = None
    reconstruction: torch.Tensor | None = None

    @property
    def seq_len(self) -> int:
        return self.keys.shape[2]

    @property
    def num_kv_heads(self) -> int:
        return self.keys.shape[1]

    def context_queries(self, reader: str) -> torch.Tensor:
        """The queries of the N context tokens ``[B, H, N, D]`` (the last N recorded), for presses that read them all.

        ``reader`` names the press or option in the error raised when fewer were recorded.
        """
        n = self.seq_len
        have = 0 if self.queries is None else self.queries.shape[2]
        if have < n:
            raise ValueError(f"{reader} needs the queries of all {n} context tokens, the runtime captured {have}")
        return self.queries[:, :, have - n :]

    @property
    def scaling(self) -> float:
        if self.module is not None and hasattr(self.module, "scaling"):
            return float(self.module.scaling)
        return 1.0 / math.sqrt(self.keys.shape[-1])


# ``query_window`` of a press that reads the queries of every context token (H2O):
# the recorder keeps the last min(window, N) queries, so any window >= N means all.
ALL_QUERIES = 1 << 40


def check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {sorted(allowed)!r}, got {value!r}")


def pool_scores(scores: torch.Tensor, pooling: str | None, kernel_size: int) -> torch.Tensor:
    """Smooth ``[..., L]`` scores along the tokens (SnapKV-style clustering), shape kept.

    ``pooling``: ``"max"`` (a token takes its neighbourhood's best score), ``"avg"`` (the mean,
    edges averaged over the tokens there), or ``None``; ``kernel_size`` is odd.
    """
    if pooling is None or kernel_size == 1:
        return scores
    flat = scores.reshape(-1, 1, scores.shape[-1])
    pad = kernel_size // 2
    if pooling == "max":
        out = F.max_pool1d(flat, kernel_size, stride=1, padding=pad)
    else:
        out = F.avg_pool1d(flat, kernel_size, stride=1, padding=pad, count_include_pad=False)
    return out.view_as(scores)


def check_odd_kernel(name: str, value) -> None:
    """A pooling width: an odd integer >= 1, so pooling keeps token positions aligned."""
    check_int(name, value, 1)
    if value % 2 == 0:
        raise ValueError(f"{name} must be odd so pooling keeps positions aligned, got {value}")


def check_int(name: str, value, minimum: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        extra = " or None" if allow_none else ""
        raise ValueError(f"{name} must be an integer >= {minimum}{extra}, got {value!r}")


def check_float(name: str, value, minimum: float, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) and value >= minimum
    if not ok:
        extra = " or None" if allow_none else ""
        raise ValueError(f"{name} must be a finite number >= {minimum}{extra}, got {value!r}")


@dataclass
class Press:
    """Base class of every scoring rule.

    ``compression_ratio`` is the fraction of the context's tokens removed, in
    ``[0, 1)``; 0 is an exact no-op (nothing is scored, nothing is copied).

    Subclasses implement :meth:`score` and may protect tokens from eviction
    through :attr:`protected_sinks` (the first tokens) and
    :attr:`protected_recent` (the last tokens), which the selection honours
    whatever the scores say. :attr:`query_window` is the number of last
    context queries the press reads from ``view.queries`` (0: none).
    ``scores_comparable_across_heads`` tells head-adaptive selection whether
    one head's scores may be ranked against another's.
    """

    compression_ratio: float = 0.0

    scores_comparable_across_heads = False

    # Head-adaptive presses share a layer's budget across its KV heads (AdaKVPress's selection, with
    # each head first keeping its own top ``alpha`` share of the mean budget); the cache is ragged.
    head_adaptive = False
    alpha = 0.0

    def __post_init__(self) -> None:
        r = self.compression_ratio
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not (0.0 <= r < 1.0) or math.isnan(r):
            raise ValueError(f"compression_ratio must be a float in [0, 1), got {r!r}")
        self.compression_ratio = float(r)

    @property
    def name(self) -> str:
        return type(self).__name__.removesuffix("Press").lower()

    @property
    def protected_sinks(self) -> int:
        return 0

    @property
    def protected_recent(self) -> int:
        return 0

    @property
    def query_window(self) -> int:
        return 0

    # Set by presses whose budgets or queries need every layer's prefill before any layer
    # is compressed (dynamic layer budgets, lookahead queries): the runtime then keeps the
    # full cache until the prefill ends, so their peak memory is the full cache's.
    needs_full_prefill = False

    # Set by presses scored while the model reconstructs the context from a prompt (KVzip):
    # the runtime runs those passes (:mod:`curdkv.runtime.reconstruction`) in the chunks of
    # :meth:`reconstruction_chunking` and hands what the press gathered from them over as
    # ``ScoringView.reconstruction``.
    reconstructs_context = False

    def reconstruction_chunking(self) -> tuple[int, int]:
        """``(chunk_size, previous_tail)``: the context is reconstructed ``chunk_size`` tokens at a time,
        each pass prompted with the previous chunk's last ``previous_tail`` tokens (KVzip's 2048 and 8)."""
        return 2048, 8

    def reconstruction_state(self, batch: int, kv_heads: int, seq_len: int, head_dim: int,
                             device: torch.device) -> torch.Tensor:
        """What one layer gathers over the reconstruction passes, before the first (zeros)."""
        raise NotImplementedError(f"press {self.name!r} does not reconstruct the context")

    def absorb_chunk(self, state: torch.Tensor, queries: torch.Tensor, sink_keys: torch.Tensor,
                     chunk_keys: torch.Tensor, own_keys: torch.Tensor, start: int, scaling: float) -> None:
        """Gather, into ``state`` in place, one layer's part of the pass over the chunk at ``start``.

        ``queries`` ``[B, H, q, D]``: the pass's post-RoPE queries;
        ``sink_keys``, ``chunk_keys``: the cached keys of the sinks and of the chunk;
        ``own_keys``: the pass's own keys.
        """
        raise NotImplementedError(f"press {self.name!r} does not reconstruct the context")

    @property
    def lookahead_tokens(self) -> int:
        """Pseudo queries the press wants after its window (Lookahead Q-Cache); 0: none."""
        return 0

    @property
    def compresses_after_prefill(self) -> bool:
        """Whether the runtime compresses every layer only once the whole prefill has run."""
        return bool(self.needs_full_prefill or self.lookahead_tokens)

    def score(self, view: ScoringView) -> torch.Tensor:
        """Return float32 scores ``[B, H_kv, N]``; higher means keep."""
        raise NotImplementedError

    def layer_keep(self, seq_len: int, layer_idx: int, num_layers: int) -> int:
        """Tokens each KV head keeps at one layer (the mean over heads for head-adaptive presses).

        The same at every layer unless the press sets layer budgets (PyramidKV).
        """
        return kept_count(seq_len, self.compression_ratio)

    def check_context(self, seq_len: int) -> None:
        """Raise if a context of about ``seq_len`` tokens cannot honour the protected tokens at this ratio.

        Callers that know the context length before a model loads (the CLI)
        check here, so the error comes before a minutes-long load and prefill.
        """
        check_budget(seq_len, self.layer_keep(seq_len, 0, 1), self.protected_sinks, self.protected_recent)

    def layer_keeps(self, scores: list[torch.Tensor], seq_len: int) -> list[int]:
        """Per-layer budgets from every layer's scores, for presses with ``needs_full_prefill``.

        The default is :meth:`layer_keep` at each layer; presses that allocate
        budgets across layers from the scores (LAVa) override it.
        """
        return [self.layer_keep(seq_len, i, len(scores)) for i in range(len(scores))]

    # Whether scores change with compression_ratio (Lookahead Q-Cache decodes its pseudo
    # queries from a cache compressed at that ratio). Sweeps reuse the others' scores across ratios.
    scores_depend_on_ratio = False

    # Presses that can choose their compression ratio for each context (Compactor).
    calibrates = False

    def calibrated_ratio(self, context_nll, tolerance: float) -> float:
        """The compression ratio this press chooses at ``tolerance`` for a context whose token-averaged
        NLL under the model is ``context_nll`` (a float, or ``[B]``: the ratio safe for every row).

        The runtime or the eval harness measures the NLL
        (:func:`curdkv.runtime.nll.context_nll`); a press never runs the model.
        """
        raise ValueError(f"press {self.name!r} cannot choose its ratio per context; use a fixed compression_ratio")

    def with_ratio(self, compression_ratio: float) -> "Press":
        """A copy of this press at another compression ratio."""
        kwargs = {f.name: getattr(self, f.name) for f in fields(self) if f.init}
        kwargs["compression_ratio"] = compression_ratio
        return type(self)(**kwargs)

    def describe(self) -> str:
        params = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in fields(self) if f.init)
        return f"{type(self).__name__}({params})"


# What the runtime reads of a press besides its scores: a wrapper hands each on from the press it wraps,
# unless it declares the trait its own (WrapperPress.own_traits).
TRAITS = ("protected_sinks", "protected_recent", "query_window", "needs_full_prefill", "lookahead_tokens",
          "scores_depend_on_ratio", "calibrates", "scores_comparable_across_heads", "head_adaptive", "alpha",
          "reconstructs_context")


class WrapperPress(Press):
    """A press that scores through another (``self.press``) and changes how its scores are used.

    Every trait in :data:`TRAITS` and the budgets (:meth:`layer_keep`,
    :meth:`layer_keeps`) come from the wrapped press at this press's ratio, so
    a wrapper never drops one (a wrapped PyramidKV keeps its layer budgets, a
    wrapped Lookahead Q-Cache its pseudo queries). A subclass that sets a trait
    itself defines it as a class attribute and names it in ``own_traits``.
    """

    press: Press
    own_traits: tuple[str, ...] = ()

    def wrapped_at_ratio(self) -> Press:
        """The wrapped press at this press's compression ratio (what its budgets are computed at)."""
        if self.press.compression_ratio == self.compression_ratio:
            return self.press
        return self.press.with_ratio(self.compression_ratio)

    def layer_keep(self, seq_len: int, layer_idx: int, num_layers: int) -> int:
        return self.wrapped_at_ratio().layer_keep(seq_len, layer_idx, num_layers)

    def layer_keeps(self, scores: list[torch.Tensor], seq_len: int) -> list[int]:
        return self.wrapped_at_ratio().layer_keeps(scores, seq_len)

    def calibrated_ratio(self, context_nll, tolerance: float) -> float:
        return self.press.calibrated_ratio(context_nll, tolerance)

    def reconstruction_chunking(self) -> tuple[int, int]:
        return self.press.reconstruction_chunking()

    def reconstruction_state(self, *args) -> torch.Tensor:
        return self.press.reconstruction_state(*args)

    def absorb_chunk(self, *args) -> None:
        self.press.absorb_chunk(*args)


def _delegated(trait: str) -> property:
    return property(lambda self: getattr(self.press, trait), doc=f"The wrapped press's ``{trait}``.")


for _trait in TRAITS:
    setattr(WrapperPress, _trait, _delegated(_trait))


def check_press(press) -> Press:
    """``press`` must be a curdkv press instance (what every entry point and wrapper takes)."""
    if not isinstance(press, Press):
        raise TypeError(f"press must be a curdkv Press (e.g. curdkv.CurDKVPress()), got {type(press).__name__}")
    return press


