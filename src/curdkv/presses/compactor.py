"""Compactor: approximate key leverage blended with non-causal chunked attention.

The paper's context-calibrated compression (the ratio chosen per context from
a tolerance) is in :mod:`curdkv.presses.calibration`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..kernels.leverage import whitening
from .base import ALL_QUERIES, Press, ScoringView, check_choice, check_float, check_int, check_odd_kernel, pool_scores
from .calibration import CalibrationCurve, calibrated_ratio
from .rope import unrotate

NORMALIZATIONS = ("head", "layer")
LOGIT_SCALES = ("unscaled", "model")

# Ridge on the unit-diagonal sketched Gram matrix (the whitening of curdkv's exact
# leverage): keeps rank-deficient heads finite (a sketch wider than the head, constant
# keys) while moving well-conditioned leverages by ~1e-6 relative.
LEVERAGE_RIDGE = 1e-6
# Chunks are scored a block at a time so the [B, H, chunks, C, C] probabilities stay
# under this many elements (256 MiB of float32) at any context length.
ATTENTION_BLOCK_ELEMENTS = 1 << 26
# A z-score divides by max(std, this * max|score|): a head whose scores differ only by
# float rounding (constant keys) gets z-scores near 0, not amplified rounding noise.
ZSCORE_RELATIVE_FLOOR = 1e-6


# --------------------------------------------------------------------------- the two scores


def approximate_leverage(keys: torch.Tensor, sketch: torch.Tensor) -> torch.Tensor:
    """Approximate leverage scores of each head's centred keys: float32 ``[B, H, N]``.

    keys ``[B, H, N, D]``; sketch ``Φ`` ``[D, k]``. The keys are centred over
    the N tokens, right-sketched to ``X = (K - mean) Φ`` ``[N, k]``, and each
    row's leverage ``x_j (XᵀX)⁻¹ x_jᵀ`` is read as ``‖x_j W‖²`` with
    ``W Wᵀ = (XᵀX + ridge)⁻¹`` from a Cholesky factor of the k x k Gram matrix
    (:func:`curdkv.kernels.leverage.whitening`: unit-diagonal scaling, a ridge
    of :data:`LEVERAGE_RIDGE`, an eigen-solve if Cholesky fails). The small
    solve and the row norms run in float64.
    """
    x = keys.float()
    x = x - x.mean(dim=-2, keepdim=True)
    sketched = (x @ sketch.to(device=x.device, dtype=torch.float32)).double()
    w = whitening(sketched.transpose(-1, -2) @ sketched, LEVERAGE_RIDGE)
    return (sketched @ w).square().sum(-1).float()


def _chunk_column_sums(q: torch.Tensor, k: torch.Tensor, size: int, scaling: float) -> torch.Tensor:
    """Column sums of non-causal softmax attention inside consecutive chunks of ``size`` tokens.

    q ``[B, H_kv, G, L, D]``, k ``[B, H_kv, L, D]`` float32 with L a multiple of
    ``size``; returns ``[B, H_kv, L]`` summed over each chunk's queries and
    averaged over the G query heads of a group.
    """
    b, h_kv, g, length, d = q.shape
    chunks = length // size
    qc = q.reshape(b, h_kv, g, chunks, size, d)
    kc = k.reshape(b, h_kv, chunks, size, d)
    probs = torch.einsum("bkgcid,bkcjd->bkgcij", qc, kc)
    if scaling != 1.0:
        probs.mul_(scaling)
    probs = probs.softmax(dim=-1)
    return probs.sum(dim=-2).mean(dim=2).reshape(b, h_kv, length)


def non_causal_chunked_attention(
    queries: torch.Tensor, keys: torch.Tensor, chunk_size: int, scaling: float = 1.0
) -> torch.Tensor:
    """Attention each key receives inside its chunk, every query seeing every key: float32 ``[B, H_kv, N]``.

    queries ``[B, H, N, D]`` and keys ``[B, H_kv, N, D]`` are the same N tokens
    (post-RoPE). Tokens ``0 .. N-1`` are cut into chunks of ``chunk_size`` (the
    last one shorter); in each chunk, every query attends to every key of the
    chunk with no causal mask, ``softmax(scaling * q kᵀ)`` over the chunk's
    keys, and a key's score is the sum over the chunk's queries, averaged over
    the query heads of its GQA group (query head h reads KV head ``h // G``).
    """
    b, h, n, d = queries.shape
    h_kv = keys.shape[1]
    if h % h_kv:
        raise ValueError(f"{h} query heads cannot share {h_kv} KV heads evenly")
    if queries.shape[2] != keys.shape[2]:
        raise ValueError(f"queries and keys must be the same tokens, got {queries.shape[2]} and {keys.shape[2]}")
    group = h // h_kv
    out = torch.empty(b, h_kv, n, dtype=torch.float32, device=keys.device)
    per_block = max(1, ATTENTION_BLOCK_ELEMENTS // (b * h * chunk_size * chunk_size))
    for start in range(0, n, per_block * chunk_size):
        stop = min(n, start + per_block * chunk_size)
        q = queries[:, :, start:stop].float().reshape(b, h_kv, group, stop - start, d)
        k = keys[:, :, start:stop].float()
        whole = (stop - start) // chunk_size * chunk_size
        if whole:
            out[..., start : start + whole] = _chunk_column_sums(q[:, :, :, :whole], k[:, :, :whole], chunk_size, scaling)
        if start + whole < stop:  # the context's last, shorter chunk: its tokens attend among themselves
            tail = stop - start - whole
            out[..., start + whole : stop] = _chunk_column_sums(q[:, :, :, whole:], k[:, :, whole:], tail, scaling)
    return out


def zscore(scores: torch.Tensor, over: str = "head") -> torch.Tensor:
    """``(s - mean) / std`` per head (``over="head"``) or over all heads of a batch element (``"layer"``).

    The standard deviation is the population one, floored at
    :data:`ZSCORE_RELATIVE_FLOOR` times the largest magnitude so constant
    heads give zeros instead of NaN or amplified rounding noise.
    """
    check_choice("over", over, NORMALIZATIONS)
    dims = (-1,) if over == "head" else (-2, -1)
    centred = scores - scores.mean(dim=dims, keepdim=True)
    std = centred.square().mean(dim=dims, keepdim=True).sqrt()
    floor = scores.abs().amax(dim=dims, keepdim=True) * ZSCORE_RELATIVE_FLOOR
    return centred / torch.maximum(std, floor).clamp_min(torch.finfo(scores.dtype).tiny)


# --------------------------------------------------------------------------- the press


def _check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")


@dataclass
class CompactorPress(Press):
    """Compactor (Chari & Van Durme 2025, "Compactor: Calibrated Query-Agnostic KV
    Cache Compression with Approximate Leverage Scores", arXiv 2507.08143).

    Each KV head scores its tokens with two query-agnostic signals, each
    z-scored and blended as ``s = z(a) + blending * z(o)``:

    - ``o``, approximate leverage of the centred pre-RoPE keys (the paper's
      Algorithm 1): a right Gaussian sketch ``Φ`` ``[D, sketch_dim]`` with
      entries ``N(0, 1/sketch_dim)`` and leverage of ``(K - mean) Φ`` by a
      Cholesky solve (:func:`approximate_leverage`). Keys that point in rare
      directions (outliers of the key space) score high however little they
      are attended. Pre-RoPE keys come from the cached keys by undoing the
      model's RoPE (:func:`curdkv.presses.rope.unrotate`).
    - ``a``, non-causal chunked attention: the context is cut into chunks of
      ``chunk_size`` tokens; inside a chunk every query attends to every key
      (no causal mask) and a key scores the attention its chunk's queries give
      it, averaged over the GQA group (:func:`non_causal_chunked_attention`),
      times its value norm ``‖v_j‖``, then mean-pooled over
      ``pool_kernel`` neighbouring tokens. It needs the queries of every context
      token (``query_window`` is :data:`~curdkv.presses.base.ALL_QUERIES`).

    The first ``num_sinks`` and last ``num_recent`` tokens are always kept and
    take no part in either score (nor in its centring, chunks or z-score); the
    rest of the budget goes to the highest blended scores.

    Defaults: ``blending=0.3``, ``sketch_dim=48``, ``chunk_size=256`` are the
    paper's stated hyperparameters. ``num_sinks=8``, ``num_recent=4`` are those
    of the authors' kvpress ``CompactorPress``: the paper's hyperparameters
    name no protected tokens, and the authors' compactor-vllm engine protects
    8 or 16 first and 64 last tokens.

    Where this departs from the paper or chooses between its implementations:

    1. Leverage from a Cholesky solve of the sketched Gram matrix instead of
       its SVD (Algorithm 1 steps 4-5): the same quantity up to the ridge, as
       in kvpress. The ridge is relative (1e-6 on the unit-scaled Gram
       matrix) where kvpress adds an absolute 1e-2 jitter and compactor-vllm
       5e-3, so it does not depend on the keys' scale.
    2. Keys are centred before the sketch, as both of the authors' codes do
       (Algorithm 1 as printed does not centre). Centring and leverage span
       the whole scored context, as kvpress; compactor-vllm computes them in
       blocks of 512 tokens.
    3. The value-norm weighting and the width-3 pooling follow kvpress's
       ``NonCausalAttnPress``; the paper's formula (and compactor-vllm) use the
       bare column sums: ``value_weighting=False``, ``pool_kernel=1`` give
       that form. Pooling ignores padding at the ends (kvpress counts it).
    4. Attention logits are unscaled, ``softmax(Q Kᵀ)``, as in the paper's
       formula and both of the authors' codes; ``logit_scale="model"`` uses
       the model's ``1/√d`` instead.
    5. Z-scores are per KV head (the paper scores each head independently);
       both of the authors' codes z-score over all heads of a layer at once,
       which ``normalization="layer"`` reproduces.
    6. The blend weight defaults to the paper's 0.3; kvpress uses
       ``blending = compression_ratio`` (``blending=None`` here) and
       compactor-vllm 0.5.
    7. One sketch, drawn from ``seed``, serves every head and layer (as in
       compactor-vllm; kvpress draws a fresh, unseeded one per call), so
       scores repeat exactly.
    8. The last chunk may be shorter; its tokens attend among themselves (as
       kvpress; compactor-vllm pads its mass with ``1/C`` per missing query).
    9. Selection is per KV head (the same number of tokens per head); the
       paper's top-k over all heads of a layer is ``AdaKVPress(CompactorPress(...))``.
    10. Only a first prefill is scored (``view.positions`` must be ``None``):
        the non-causal attention pairs every cached key with its own token's
        query, which compression during decoding no longer has.

    The blended scores are z-scores, unitless with mean 0 and spread 1 in
    every head, and the paper ranks them across the heads of a layer, so
    ``scores_comparable_across_heads`` is True: AdaKVPress may rank them jointly
    (per-head normalisation makes each head's score distribution similar, so
    head budgets move less than with ``normalization="layer"``).

    Context-calibrated compression (the paper's second contribution) is
    :meth:`calibrated_ratio`; it needs ``calibration_alpha`` and
    ``calibration_beta``, the curve fitted for this model and press by
    :func:`fit_calibration` (no default: the paper fits them per model).
    """

    sketch_dim: int = 48
    chunk_size: int = 256
    blending: float | None = 0.3
    num_sinks: int = 8
    num_recent: int = 4
    value_weighting: bool = True
    pool_kernel: int = 3
    logit_scale: str = "unscaled"
    normalization: str = "head"
    seed: int = 0
    calibration_alpha: float | None = None
    calibration_beta: float | None = None

    scores_comparable_across_heads = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("sketch_dim", self.sketch_dim, 1)
        check_int("chunk_size", self.chunk_size, 1)
        check_float("blending", self.blending, 0.0, allow_none=True)
        if self.blending is not None:
            self.blending = float(self.blending)
        check_int("num_sinks", self.num_sinks, 0)
        check_int("num_recent", self.num_recent, 0)
        _check_bool("value_weighting", self.value_weighting)
        check_odd_kernel("pool_kernel", self.pool_kernel)
        check_choice("logit_scale", self.logit_scale, LOGIT_SCALES)
        check_choice("normalization", self.normalization, NORMALIZATIONS)
        check_int("seed", self.seed, 0)
        check_float("calibration_alpha", self.calibration_alpha, -math.inf, allow_none=True)
        check_float("calibration_beta", self.calibration_beta, -math.inf, allow_none=True)
        if (self.calibration_alpha is None) != (self.calibration_beta is None):
            raise ValueError(
                "calibration_alpha and calibration_beta must be given together (a curve from fit_calibration), "
                f"got alpha={self.calibration_alpha!r}, beta={self.calibration_beta!r}"
            )
        self._sketches: dict[tuple, torch.Tensor] = {}

    @property
    def protected_sinks(self) -> int:
        return self.num_sinks

    @property
    def protected_recent(self) -> int:
        return self.num_recent

    @property
    def query_window(self) -> int:
        return ALL_QUERIES

    @property
    def scores_depend_on_ratio(self) -> bool:
        return self.blending is None  # the blend weight is then the compression ratio

    @property
    def blend_weight(self) -> float:
        """The weight of the leverage z-scores: ``blending``, or the compression ratio when it is ``None``."""
        return self.compression_ratio if self.blending is None else self.blending

    def sketch(self, head_dim: int, device) -> torch.Tensor:
        """The Gaussian sketch ``Φ`` ``[head_dim, sketch_dim]``, entries ``N(0, 1/sketch_dim)``, from ``seed``."""
        key = (head_dim, str(device))
        if key not in self._sketches:
            # Drawn on the CPU so every device gets the same sketch.
            gen = torch.Generator(device="cpu").manual_seed(self.seed)
            phi = torch.randn(head_dim, self.sketch_dim, generator=gen) / math.sqrt(self.sketch_dim)
            self._sketches[key] = phi.to(device)
        return self._sketches[key]

    def _span(self, n: int) -> tuple[int, int]:
        start = min(self.num_sinks, n)
        return start, max(start, n - self.num_recent)

    def leverage(self, view: ScoringView, start: int, stop: int) -> torch.Tensor:
        """Approximate leverage of the pre-RoPE keys of tokens ``start .. stop - 1``, ``[B, H_kv, stop - start]``."""
        keys = unrotate(view.keys[:, :, start:stop], view.module, start=start)
        return approximate_leverage(keys, self.sketch(keys.shape[-1], keys.device))

    def attention(self, view: ScoringView, start: int, stop: int) -> torch.Tensor:
        """Pooled (value-weighted) non-causal chunked attention of tokens ``start .. stop - 1``."""
        queries = view.context_queries("CompactorPress (query_window=ALL_QUERIES)")[:, :, start:stop]
        scaling = 1.0 if self.logit_scale == "unscaled" else view.scaling
        scores = non_causal_chunked_attention(queries, view.keys[:, :, start:stop], self.chunk_size, scaling)
        if self.value_weighting:
            scores = scores * view.values[:, :, start:stop].float().norm(dim=-1)
        return pool_scores(scores, "avg", self.pool_kernel)

    def score(self, view: ScoringView) -> torch.Tensor:
        if view.positions is not None:
            raise ValueError(
                "CompactorPress scores a first prefill only (cached tokens at positions 0 .. N-1): its non-causal "
                "attention needs each cached token's own query, which compression during decoding does not keep"
            )
        n = view.seq_len
        start, stop = self._span(n)
        out = torch.zeros(view.keys.shape[:3], dtype=torch.float32, device=view.keys.device)
        if stop == start:
            return out  # every token is protected
        blended = zscore(self.attention(view, start, stop), self.normalization) + self.blend_weight * zscore(
            self.leverage(view, start, stop), self.normalization
        )
        out[..., start:stop] = blended
        # Protected tokens are kept by selection; give them the top score so the tensor covers all N.
        top = blended.amax(dim=-1, keepdim=True)
        out[..., :start] = top
        out[..., stop:] = top
        return out

    # ------------------------------------------------------------------ calibration

    @property
    def calibrates(self) -> bool:  # type: ignore[override]
        return self.calibration_alpha is not None

    @property
    def calibration_curve(self) -> CalibrationCurve:
        if self.calibration_alpha is None:
            raise ValueError(
                "CompactorPress chooses its ratio per context only with a fitted curve: set calibration_alpha and "
                "calibration_beta (from fit_calibration on NLL ratios measured with nll_ratio for this model)"
            )
        return CalibrationCurve(self.calibration_alpha, self.calibration_beta)

    def calibrated_ratio(self, context_nll, tolerance: float) -> float:
        """The compression ratio for one context (:func:`calibrated_ratio` of its NLL).

        The paper's predictor reads the context's NLL under the model, not its
        keys, values or queries: a :class:`~curdkv.runtime.capture.PrefillCapture`
        measures it (``capture.context_nll``).
        """
        if context_nll is None:
            raise ValueError(
                "Compactor's calibration predicts the ratio from the context's NLL under the model: context_nll "
                "is None (capture_prefill keeps the model and ids it needs; see curdkv.runtime.nll.context_nll)"
            )
        return calibrated_ratio(self.calibration_curve, context_nll, tolerance)
