"""CurDKV: value-guided token selection by CUR leverage scores."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels.leverage import (
    fast_path_available,
    half_precision_leverage,
    projection_terms,
    transformed_norms,
    whitening,
)
from ..selection import check_budget, kept_count, shared_threshold_keeps
from .base import ALL_QUERIES, Press, ScoringView, check_choice, check_float, check_int, check_odd_kernel, pool_scores
from .peak_attention import evenly_spaced, peak_context_attention
from .rope import rotate_by, unrotate

LEVERAGES = ("kv_product", "key", "value", "kv_avg")
ESTIMATORS = ("projection", "exact")
KEY_SPACES = ("post_rope", "pre_rope")
ROW_SPACES = ("keys", "window_queries", "reconstruction_queries")
QUERY_ROW_SPACES = ("window_queries", "reconstruction_queries")
LAYER_BUDGETS = ("uniform", "leverage_mass", "context_attention")
POOLINGS = ("max", "avg")
DEFAULT_RIDGE = 1e-6
# Where context attention places the context's queries: after the context and a prompt about as long as
# KVzip's "repeat the context" prompt with its chat template, as if the model were reading the context back.
READ_BACK_GAP = 16


def projected_leverage(states: torch.Tensor, projection: torch.Tensor | None) -> torch.Tensor:
    """Squared row norms of ``states @ G`` per head.

    states: ``[B, H, N, D]``; projection ``G``: ``[H, D, r]`` or ``None`` (no
    sketch, plain squared row norms). Returns float32 ``[B, H, N]``.
    """
    x = states.float()
    if projection is not None:
        x = torch.einsum("bhnd,hdr->bhnr", x, projection)
    return x.square().sum(-1)


def exact_leverage(states: torch.Tensor, ridge: float = 1e-6) -> torch.Tensor:
    """Leverage scores of each head's ``[N, D]`` matrix: squared row norms of U in X = U S Vt.

    Computed as ``‖x_j W‖²`` with ``W Wᵀ = (XᵀX)⁻¹`` from a Cholesky factor of
    the D x D Gram matrix (:func:`curdkv.kernels.leverage.whitening`), so the
    cost is O(N D²) rather than an N x D SVD. Leverage is unchanged by
    rescaling columns, so columns are scaled to unit norm first (keys and
    values have channels of very different magnitude, which would otherwise
    make the Gram matrix ill-conditioned); a ridge of ``ridge`` on that unit
    diagonal keeps rank-deficient heads finite (their null directions then
    carry ~0 leverage, as in the SVD with zero singular values dropped).

    Everything runs in float64: with a condition number near 1/ridge, float32
    Cholesky factors of real heads (Qwen2.5's first layer) came out with NaN
    on CUDA without reporting failure. The half-precision route of the same
    whitening on CUDA is :func:`exact_leverages`.
    """
    x = states.double()
    return (x @ whitening(x.transpose(-1, -2) @ x, ridge)).square().sum(-1).float()


def subspace_leverage(states: torch.Tensor, ridge: float = DEFAULT_RIDGE, rank: int | None = None,
                      centre: bool = False) -> torch.Tensor:
    """Leverage in the top ``rank`` right singular directions (all: ``None``), optionally of centred rows.

    Float64 and obvious: the Gram matrix plus ``ridge`` eigendecomposed, and
    ``ℓ_j = Σ_i (x_j·v_i)² / λ_i`` over the ``rank`` largest eigenvalues. With
    every direction, leverage does not change when columns are rescaled, so
    they are scaled to unit norm first (as :func:`exact_leverage`, which this
    then equals without centring); a truncated rank is measured in the
    matrix's own leading directions, unscaled. Returns float32 ``[B, H, N]``.
    """
    x = states.double()
    if centre:
        x = x - x.mean(dim=-2, keepdim=True)
    if rank is None:
        x = x / x.square().sum(-2, keepdim=True).sqrt().clamp_min(1e-30)
    gram = x.transpose(-1, -2) @ x
    evals, evecs = torch.linalg.eigh(gram + ridge * torch.eye(gram.shape[-1], dtype=x.dtype, device=x.device))
    if rank is not None:
        evals, evecs = evals[..., -rank:], evecs[..., -rank:]
    return ((x @ evecs).square() / evals.unsqueeze(-2)).sum(-1).float()


def project_on_queries(keys: torch.Tensor, queries: torch.Tensor | None, rank: int, key_space: str, module,
                       seq_len: int) -> torch.Tensor:
    """``keys [B, H_kv, N, D]`` in the ``rank`` leading directions of their group's window queries: ``[B, H_kv, N, r]``.

    ``queries [B, H, W, D]`` are post-RoPE (un-rotated too when the keys are pre-RoPE).
    """
    if queries is None:
        raise ValueError("row_space='window_queries' reads the window's queries; the view has none")
    if key_space == "pre_rope":
        queries = unrotate(queries, module, start=seq_len - queries.shape[2])
    return project_on_gram(keys, query_gram(queries, keys.shape[1]), rank)


def query_gram(queries: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """``Σ q qᵀ`` over the queries ``[B, H, q, D]`` of each GQA group, float64 ``[B, H_kv, D, D]``."""
    b, h, w, d = queries.shape
    q = queries.double().reshape(b, kv_heads, (h // kv_heads) * w, d)
    return q.transpose(-1, -2) @ q


def project_on_gram(keys: torch.Tensor, gram: torch.Tensor, rank: int) -> torch.Tensor:
    """``keys [B, H_kv, N, D]`` in the ``rank`` leading eigenvectors of ``gram [B, H_kv, D, D]``."""
    _, evecs = torch.linalg.eigh(gram)
    return keys.to(evecs.dtype) @ evecs[..., -rank:]


def exact_leverages(keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact key and value leverage by the fastest accurate route here.

    On CUDA with Triton and a bf16/fp16 cache: two reads of the states in
    their own dtype (:mod:`curdkv.kernels.leverage`); elsewhere the float64
    :func:`exact_leverage`.
    """
    if fast_path_available(keys) and fast_path_available(values) and keys.dtype == values.dtype:
        return tuple(half_precision_leverage(keys, values))
    return exact_leverage(keys), exact_leverage(values)


def normalise(scores: torch.Tensor, local_window: int | None) -> torch.Tensor:
    """Scale scores to sum 1 per head, or within each window of ``local_window`` tokens."""
    if local_window is None:
        return scores / scores.sum(-1, keepdim=True).clamp_min(1e-30)
    n = scores.shape[-1]
    pad = (-n) % local_window
    padded = torch.nn.functional.pad(scores, (0, pad))
    windows = padded.unflatten(-1, (-1, local_window))
    windows = windows / windows.sum(-1, keepdim=True).clamp_min(1e-30)
    return windows.flatten(-2)[..., :n]


@dataclass
class CurDKVPress(Press):
    """CurDKV (Sengupta, Chaudhary, Chakraborty 2025, arXiv 2509.15038), Algorithm 1.

    Each token's score is its key leverage times its value leverage,
    ``ℓᴷ_j · ℓⱽ_j``, normalised to sum 1 per KV head. The first
    ``num_sinks`` tokens are always kept and the rest of the budget goes to
    the top scores.

    Default: exact leverage, not the paper's sketch. Leverage of row ``j``
    of one head's ``X`` is ``x_j (XᵀX)⁻¹ x_jᵀ``, the squared row norm of
    ``U`` in ``X = UΣVᵀ``. Algorithm 1 estimates it as ``‖x_j G‖²`` with a
    Gaussian ``G ∈ R^{D×r}``, which preserves row *norms*
    (Johnson-Lindenstrauss) and so ranks tokens by ‖k_j‖·‖v_j‖, without the
    whitening by ``(XᵀX)⁻¹`` that makes it leverage. Measured, RULER 4K on
    Qwen2.5-Coder-0.5B-Instruct, question-agnostic, 50 samples per task
    (``results/ruler-qwen2.5-coder-0.5b-4k``), 13-task average with the
    full cache at 71.2:

    ============================  =====  =====
    variant                         50%    90%
    ============================  =====  =====
    exact leverage (default)       62.3   48.8
    sketch r=20 (paper)            54.3    2.7
    no sketch (squared norms)      60.6   16.8
    sketch, key leverage only      15.3    2.0
    sketch, value leverage only    59.1    7.2
    sketch, local_window=16        47.4    2.1
    ============================  =====  =====

    The best other presses score 31.9 (StreamingLLM) at 50% and 9.2
    (KNorm) at 90%. So the estimator is the exact one, with the paper's
    ``kv_product`` and whole-context normalisation (``local_window=None``):
    both of the paper's choices beat the alternatives measured.

    Default states: pre-RoPE, centred keys and centred values, not the
    cached post-RoPE states the paper scores. RoPE turns a key by an angle
    that depends on its position, which spreads keys of the same content
    over directions that leverage then reads as distinct; undoing it
    (:func:`curdkv.presses.rope.unrotate`) and removing each head's mean
    (Compactor's two choices) leaves the directions the content spans.
    Measured one factor at a time and then side by side on the same samples
    (RULER 4K, question-agnostic, 13-task average), it wins on both models:

    ==========================  ====  ====  ====  ====
    model, keys                  30%   50%   70%   90%
    ==========================  ====  ====  ====  ====
    0.5B, post-RoPE (paper)        —  64.1  55.8  49.5
    0.5B, pre-RoPE centred         —  65.1  58.1  51.8
    1.5B, post-RoPE (paper)     74.6  71.8  62.4  47.7
    1.5B, pre-RoPE centred      75.1  72.7  62.5  51.4
    ==========================  ====  ====  ====  ====

    (``results/ruler-qwen2.5-coder-0.5b-4k/study/``, 22 samples per task;
    ``results/ruler-qwen2.5-coder-1.5b-4k/wide/``, 25.) The paper's
    post-RoPE keys stay reachable as ``key_space="post_rope", centre=False``
    (registry name ``curdkv-post-rope``); ``estimator="projection"``
    (registry name ``curdkv-sketch``) is the paper's whole method, and it
    scores the cached states unless told otherwise.

    Options, for the paper's ablations and ours:

    - ``estimator``: ``"exact"`` (default) or ``"projection"`` (Algorithm 1's
      sketch with ``r = projection_dim``; ``projection_dim=None`` gives plain
      squared row norms). ``projection_dim`` is ignored by the exact
      estimator.
    - ``leverage``: ``"kv_product"`` (paper), ``"key"``, ``"value"``, or
      ``"kv_avg"`` (mean of the separately normalised key and value scores).
    - ``local_window``: normalise within windows of this many tokens (the
      authors' released code uses 16) instead of over the whole context.
    - ``key_space`` (``"pre_rope"`` or ``"post_rope"``) and ``centre``:
      the states scored, as above. Left unset they are pre-RoPE and
      centred, except for the routes that read the cached states (the
      sketch, reconstruction queries), where they are post-RoPE and not
      centred.
    - For the study of what moves accuracy: ``ridge`` is the whitening's
      (``1e-6``); ``rank`` measures leverage in only the ``rank`` leading
      singular directions; ``row_space="window_queries"`` measures key
      leverage in the ``rank`` leading directions of the last ``window``
      queries of the key's GQA group instead (the directions attention
      reads keys along, which softmax(QKᵀ)V's dominant subspace is made
      of); ``row_space="reconstruction_queries"`` takes the directions from
      the queries of KVzip's passes that ask the model to repeat its
      context (:mod:`curdkv.runtime.reconstruction`, about two more
      prefills, so not a single-pass press). These take the float64 route
      of :func:`subspace_leverage`; the default's states alone take the
      fast routes.
    - ``layer_budget="leverage_mass"``: layers get different budgets (the
      model's mean stays the ratio's): every head's scores are a
      distribution, and the tokens above one threshold over all layers and
      heads are kept (:func:`curdkv.selection.shared_threshold_keeps`), which
      keeps the most score mass in total. A layer whose leverage is spread
      over many tokens gets more of the budget than one where a few tokens
      hold it. It needs every layer's scores first, so the layers are cut
      after the prefill (``needs_full_prefill``).
    - ``layer_budget="context_attention"``: each token's score is its
      leverage share times ``N`` times the largest attention it receives
      from any of the context's own queries, read back after the context
      (:meth:`context_attention`): the attention KVzip's reconstruction
      queries would give it, from the prefill's queries instead of two more
      passes. Attention probabilities share one absolute scale, so one
      threshold over every layer and head sets each layer's and each head's
      budget (head-adaptive, ragged cache), as in KVzip, whose lead on
      RULER's multikey needles comes mostly from those budgets. It reads
      every context query (``query_window``: all) and compresses when the
      prefill ends: :func:`curdkv.compress` scores each layer right after
      its attention and drops its queries, holding the full cache and the
      scores until then, while ``capture_prefill`` keeps every layer's
      queries (for Llama-3.1-8B at 128K tokens, 34 GB in bf16); its extra
      cost is one ``QKᵀ`` per layer. Measured on
      RULER 4K with the 0.5B model (36 samples, float32;
      ``results/ruler-qwen2.5-coder-0.5b-4k/attention-budget/study.md``):
      niah_multikey_2 rises from 67 / 0 to 100 / 100 at 50 / 70%, but the
      13-task average moves -0.6 / +0.7 / -4.5 at 50 / 70 / 90% (tasks with
      several needles lose), so it is not the default.
    - ``leverage_floor`` (with ``layer_budget="context_attention"``; 0, none,
      by default): each head first keeps its top ``leverage_floor`` share of
      the uniform per-head budget by leverage alone, and one threshold
      shares out the rest (:meth:`with_leverage_floor`). One threshold can
      leave a head with too few tokens for a needle that only it reads; the
      floor keeps every head's rarest states whatever attention they get.
      Measured with ``leverage_floor=0.25`` on RULER with the 0.5B model
      (H100, bf16, 25 samples per task, beside the other presses on the
      same samples: ``results/ruler-qwen2.5-coder-0.5b-4k/wide/`` and
      ``-8k/wide/``): 70.9 / 69.0 / 64.6 / 53.8 at 30 / 50 / 70 / 90% at
      4K, against 65.4 / 64.1 / 57.1 / 51.4 for uniform CurDKV and 71.7 /
      72.1 / 66.6 / 39.4 for KVzip (full cache 70.7); at 8K 64.2 / 62.7 /
      57.7 / 51.4 against 63.0 / 60.8 / 54.3 / 50.5 and 65.8 / 66.6 / 59.9
      / 34.7 (full 65.7); on the 1.5B model (4K) 81.8 / 78.4 / 67.7 / 56.2
      against 75.1 / 72.6 / 62.5 / 51.4 and KVzip's 83.3 / 81.3 / 74.7 /
      47.2 (full 83.6). Not the default: it trails KVzip at 30-70% on the
      1.5B model, and its peak attention reads every query against every
      key, two ``QKᵀ`` products per layer, twice the FLOPs of the prefill's
      own causal attention. With the logits materialised (the softmax in
      float32) that was 3.9× the prefill at 4K on the 0.5B model (uniform
      CurDKV 1.9×, KVzip 5.0×) and +836% on a prefill of Llama-3.1-8B's
      shape at 32K tokens (uniform CurDKV +6.5%;
      ``results/prefill_overhead-32k.json``).
      A bf16/fp16 cache on CUDA takes a Triton kernel that keeps the logits
      on chip (:mod:`curdkv.kernels.peak_attention`): there the 32K
      prefill's overhead is +160% (72 ms per layer, H100;
      ``results/prefill_overhead-32k-peak-kernel.json``).
    - ``attention_queries`` (with ``layer_budget="context_attention"``;
      ``None``, every context query, by default): the peak attention reads
      only that many queries, evenly spaced over the context. With 256 the
      32K prefill above costs +15% instead of +836%, but the peak misses
      what only a few queries attend to: at 4K the floor's 70.9 / 69.0 /
      64.6 / 53.8 fall to 68.5 / 65.8 / 59.1 / 40.7 (niah_multikey_2 at 70%
      84 → 20, niah_single_3 at 90% 100 → 0), so it is a cost knob, not a
      free saving.
    - ``shared_over_layers`` (with ``layer_budget="context_attention"``;
      ``True`` by default): ``False`` keeps every layer's uniform budget and
      lets the threshold share it out over that layer's heads only, which
      tells apart what the budgets across layers and those across heads
      each add. Measured on RULER 4K with the 0.5B model (6 samples per
      task, float32; ``results/ruler-qwen2.5-coder-0.5b-4k/layer-scope/``):
      within each layer niah_multikey_2 at 50 / 70% falls from 83 / 83 to
      uniform CurDKV's 67 / 0, and cwe rises from 30 / 30 to 53 / 40: the
      budgets across layers make the multikey gain and the cwe loss.
    - ``layer_floor`` (with ``layer_budget="context_attention"``; 0, none, by
      default): each layer first keeps its top ``layer_floor`` share of its
      uniform budget over all its heads, and one threshold over every layer
      shares out the rest (:meth:`with_layer_floor`): a floor under each
      layer's budget, as ``leverage_floor`` is one under each head's.
      ``layer_floor=1`` is ``shared_over_layers=False``. Measured with
      ``layer_floor=0.5`` beside it (same run as above): niah_multikey_2
      stays at 83 / 83, cwe at 30 / 32, so a half floor does not give cwe
      back.
    - ``pool_kernel`` (odd, 1: none) and ``pooling`` (``"max"`` or
      ``"avg"``): the normalised scores pooled over that many neighbouring
      tokens and normalised again, as SnapKV pools its attention, so that a
      kept token keeps the tokens around it (a needle's digits, a key's
      whole UUID) rather than fragments.

    Measured one at a time (RULER 4K, Qwen2.5-Coder-0.5B, 22 samples per task,
    ``results/ruler-qwen2.5-coder-0.5b-4k/study/study.md``): besides the
    states above, leverage-mass layer budgets add 2.1 at 50% but lose 2.4 at
    90% (and lose at 90% on the 1.5B model too); the ridge does not matter,
    a lower rank loses (unless measured in the queries' directions, which
    recover full rank), and pooling hurts at 50%.

    Implementation notes: the exact estimator scales columns to unit norm
    and adds a ridge of 1e-6 (finite on rank-deficient heads); on CUDA with
    a bf16/fp16 cache it runs in two reads of K and V
    (:mod:`curdkv.kernels.leverage`), elsewhere in float64. The sketch
    there runs in one read of K and V (the same kernel with ``G`` in place
    of the whitening, up to ``r = D``), elsewhere in float32. The sketch ``G``
    is one per KV head, drawn from a generator seeded with ``seed``, shared
    by K and V (one per head size where they differ) and by all layers, so
    runs repeat exactly. Scores are float32
    whatever the model dtype. Undoing RoPE needs the attention module's
    config (``ScoringView.module``): where a caller has none, or the model's
    RoPE is partial, the error says to score the cached keys instead.

    Scores are normalised per head, so they are comparable across heads in the
    sense the paper's AdaCurDKVPress uses (each head's scores form a distribution).
    """

    projection_dim: int | None = 20
    leverage: str = "kv_product"
    estimator: str = "exact"
    local_window: int | None = None
    num_sinks: int = 4
    seed: int = 0
    key_space: str | None = None
    centre: bool | None = None
    ridge: float = DEFAULT_RIDGE
    rank: int | None = None
    row_space: str = "keys"
    window: int = 64
    layer_budget: str = "uniform"
    leverage_floor: float = 0.0
    attention_queries: int | None = None
    shared_over_layers: bool = True
    layer_floor: float = 0.0
    pool_kernel: int = 1
    pooling: str = "max"

    scores_comparable_across_heads = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("projection_dim", self.projection_dim, 1, allow_none=True)
        check_choice("leverage", self.leverage, LEVERAGES)
        check_choice("estimator", self.estimator, ESTIMATORS)
        check_int("local_window", self.local_window, 1, allow_none=True)
        check_int("num_sinks", self.num_sinks, 0)
        check_int("seed", self.seed, 0)
        check_float("ridge", self.ridge, 0.0)
        check_int("rank", self.rank, 1, allow_none=True)
        check_choice("row_space", self.row_space, ROW_SPACES)
        # The one rule for the states' defaults: pre-RoPE centred keys and centred values, except where a
        # route reads the cached post-RoPE states (the paper's sketch, reconstruction queries).
        cached_states = self.estimator == "projection" or self.row_space == "reconstruction_queries"
        if self.key_space is None:
            self.key_space = "post_rope" if cached_states else "pre_rope"
        if self.centre is None:
            self.centre = not cached_states
        check_choice("key_space", self.key_space, KEY_SPACES)
        if not isinstance(self.centre, bool):
            raise ValueError(f"centre must be True or False, got {self.centre!r}")
        check_int("window", self.window, 1)
        check_choice("layer_budget", self.layer_budget, LAYER_BUDGETS)
        check_float("leverage_floor", self.leverage_floor, 0.0)
        if self.leverage_floor > 1.0:
            raise ValueError(f"leverage_floor must be in [0, 1] (a share of each head's budget), got {self.leverage_floor!r}")
        if self.leverage_floor and self.layer_budget != "context_attention":
            raise ValueError(f"leverage_floor={self.leverage_floor!r} reserves part of each head's budget before one "
                             "threshold shares out the rest: it needs layer_budget='context_attention'")
        check_int("attention_queries", self.attention_queries, 2, allow_none=True)
        if self.attention_queries is not None and self.layer_budget != "context_attention":
            raise ValueError(f"attention_queries={self.attention_queries!r} picks the queries of the peak context "
                             "attention: it needs layer_budget='context_attention'")
        if not isinstance(self.shared_over_layers, bool):
            raise ValueError(f"shared_over_layers must be True or False, got {self.shared_over_layers!r}")
        if not self.shared_over_layers and self.layer_budget != "context_attention":
            raise ValueError("shared_over_layers=False keeps each layer's uniform budget and shares it over the "
                             "layer's heads by context attention: it needs layer_budget='context_attention'")
        check_float("layer_floor", self.layer_floor, 0.0)
        if self.layer_floor > 1.0:
            raise ValueError(f"layer_floor must be in [0, 1] (a share of each layer's budget), got {self.layer_floor!r}")
        if self.layer_floor and (self.layer_budget != "context_attention" or not self.shared_over_layers):
            raise ValueError(f"layer_floor={self.layer_floor!r} holds part of each layer's budget back from the "
                             "threshold over all layers: it needs layer_budget='context_attention' and "
                             "shared_over_layers=True")
        check_odd_kernel("pool_kernel", self.pool_kernel)
        check_choice("pooling", self.pooling, POOLINGS)
        if self.row_space in QUERY_ROW_SPACES and self.rank is None:
            raise ValueError(f"row_space={self.row_space!r} needs rank (the query directions kept); every direction "
                             "would only rotate the keys, which leaves leverage as it is")
        if self.row_space == "reconstruction_queries" and self.key_space != "post_rope":
            raise ValueError("row_space='reconstruction_queries' gathers post-RoPE queries at positions after the "
                             "context; key_space must be 'post_rope'")
        if (self.transforms_states or self.subspace_route) and self.estimator != "exact":
            raise ValueError("key_space='pre_rope', centre, ridge, rank and row_space apply to the exact estimator; "
                             f"estimator={self.estimator!r} scores the cached post-RoPE keys and values "
                             "(key_space='post_rope', centre=False)")
        self._projections: dict[tuple, torch.Tensor] = {}
        self._projection_terms: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def name(self) -> str:
        return "curdkv"

    @property
    def protected_sinks(self) -> int:
        return self.num_sinks

    def projection(self, num_heads: int, head_dim: int, device: torch.device) -> torch.Tensor | None:
        """The sketch ``G`` of every KV head, ``[H_kv, D, r]``; ``None`` without projection."""
        if self.projection_dim is None:
            return None
        key = (num_heads, head_dim, str(device))
        if key not in self._projections:
            gen = torch.Generator(device="cpu").manual_seed(self.seed)
            r = self.projection_dim
            g = torch.randn(num_heads, head_dim, r, generator=gen, dtype=torch.float32) / r**0.5
            self._projections[key] = g.to(device)
        return self._projections[key]

    @property
    def transforms_states(self) -> bool:
        """Whether the keys and values scored differ from the cached ones (pre-RoPE keys, centring)."""
        return self.key_space == "pre_rope" or self.centre

    @property
    def subspace_route(self) -> bool:
        """Whether leverage is measured in a chosen subspace (ridge, rank, query row space): the float64 route.

        Without these options the fast routes of the default measure the
        (transformed) states: whole-rank leverage is the same quantity the
        float64 eigendecomposition computes, at the default's cost (on a 0.5B
        model at 4K tokens, prefill plus compression at 1.55x the prefill
        against 3.36x by the float64 route).
        """
        return self.ridge != DEFAULT_RIDGE or self.rank is not None or self.row_space != "keys"

    @property
    def query_window(self) -> int:
        if self.layer_budget == "context_attention":
            return ALL_QUERIES
        return self.window if self.row_space == "window_queries" else 0

    @property
    def head_adaptive(self) -> bool:
        # Context attention puts every head's scores on one absolute scale: one threshold over the
        # model decides each layer's and each head's share, as KVzip's selection does.
        return self.layer_budget == "context_attention"

    @property
    def needs_full_prefill(self) -> bool:
        # Budgets across layers need every layer's scores first; reconstruction runs after the prefill.
        return self.layer_budget != "uniform" or self.reconstructs_context

    @property
    def reconstructs_context(self) -> bool:
        return self.row_space == "reconstruction_queries"

    def reconstruction_state(self, batch, kv_heads, seq_len, head_dim, device) -> torch.Tensor:
        return torch.zeros(batch, kv_heads, head_dim, head_dim, dtype=torch.float64, device=device)

    def absorb_chunk(self, state, queries, sink_keys, chunk_keys, own_keys, start, scaling) -> None:
        state += query_gram(queries, state.shape[1])

    def layer_keeps(self, scores: list[torch.Tensor], seq_len: int) -> list[int]:
        if self.layer_budget == "uniform" or not self.shared_over_layers:
            return super().layer_keeps(scores, seq_len)
        n_keep = kept_count(seq_len, self.compression_ratio)
        check_budget(seq_len, n_keep, self.protected_sinks, self.protected_recent)
        return shared_threshold_keeps(scores, n_keep, seq_len, self.num_sinks)

    def transformed_states(self, view: ScoringView) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys (pre-RoPE if asked) and values, centred per head if asked, in the dtype the leverage route reads."""
        if not self.transforms_states:
            return view.keys, view.values
        keys = self.pre_rope_keys(view) if self.key_space == "pre_rope" else view.keys.float()
        values = view.values.float()
        if self.centre:
            keys = keys - keys.mean(dim=-2, keepdim=True)
            values = values - values.mean(dim=-2, keepdim=True)
        # Rounded back to the cache's own dtype, as the half-precision kernels read it: then the
        # float64 route and the kernels score the same numbers and keep the same tokens.
        return keys.to(view.keys.dtype), values.to(view.values.dtype)

    def pre_rope_keys(self, view: ScoringView) -> torch.Tensor:
        """The view's keys with RoPE undone (float32), or an error that says how to score the cached keys."""
        try:
            return unrotate(view.keys, view.module, positions=view.positions)
        except ValueError as error:
            raise ValueError(f"{error}. CurDKV scores pre-RoPE keys by default; key_space='post_rope' "
                             "(registry name 'curdkv-post-rope') scores the cached keys and needs no RoPE") from error

    def leverages(self, view: ScoringView) -> tuple[torch.Tensor, torch.Tensor]:
        """Unnormalised key and value leverage, each float32 ``[B, H_kv, N]``."""
        if self.subspace_route:
            keys = self.pre_rope_keys(view) if self.key_space == "pre_rope" else view.keys
            # In a query row space the rank is spent on the query directions the keys are projected on.
            rank = self.rank if self.row_space == "keys" else None
            if self.row_space != "keys":
                keys = self.in_query_directions(keys.double(), view)
            return (subspace_leverage(keys, self.ridge, rank, self.centre),
                    subspace_leverage(view.values, self.ridge, rank, self.centre))
        if self.estimator == "exact":
            return exact_leverages(*self.transformed_states(view))
        return self.projected(view.keys, view.num_kv_heads), self.projected(view.values, view.num_kv_heads)

    def in_query_directions(self, keys: torch.Tensor, view: ScoringView) -> torch.Tensor:
        """``keys`` in the ``rank`` leading directions of the row space's queries (window or reconstruction)."""
        if self.row_space == "window_queries":
            return project_on_queries(keys, view.queries, self.rank, self.key_space, view.module, view.seq_len)
        if view.reconstruction is None:
            raise ValueError("row_space='reconstruction_queries' reads the queries of the context's "
                             "reconstruction, which the runtime runs (curdkv.compress with a tokenizer, "
                             "curdkv.capture_prefill with text and its tokenizer); the view has none")
        return project_on_gram(keys, view.reconstruction, self.rank)

    def projected(self, states: torch.Tensor, num_heads: int) -> torch.Tensor:
        """:func:`projected_leverage` of keys or values with this press's sketch for their head size.

        Keys and values of one head size share one sketch; a model whose
        values are narrower than its keys gets one per size. On CUDA with a
        half-precision cache and ``r <= D``: one read by the Triton kernel.
        """
        g = self.projection(num_heads, states.shape[-1], states.device)
        if g is not None and g.shape[-1] <= g.shape[-2] and fast_path_available(states):
            return transformed_norms(states, *self.projection_terms(g, states.dtype))
        return projected_leverage(states, g)

    def projection_terms(self, g: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``G`` split into two ``dtype`` terms for the one-read kernel, made once per sketch and dtype."""
        key = (*g.shape, str(g.device), dtype)  # as the sketch's own key: one sketch per heads, size, device
        if key not in self._projection_terms:
            self._projection_terms[key] = projection_terms(g, dtype)
        return self._projection_terms[key]

    def score(self, view: ScoringView) -> torch.Tensor:
        scores = self.combined(*self.leverages(view))
        if self.pool_kernel != 1:
            # Pooled scores are normalised again: AdaCurDKV compares them across heads as distributions.
            scores = normalise(pool_scores(scores, self.pooling, self.pool_kernel), self.local_window)
        if self.layer_budget == "context_attention":
            shared = scores * view.seq_len * self.context_attention(view)
            if self.leverage_floor:
                shared = self.with_leverage_floor(shared, scores)
            return self.with_layer_floor(shared) if self.layer_floor else shared
        return scores

    def with_leverage_floor(self, shared: torch.Tensor, leverage: torch.Tensor) -> torch.Tensor:
        """``shared`` scores with each head's top ``leverage_floor`` share of its uniform budget, by leverage, first.

        A shared score is a leverage share (at most 1) times ``N`` times an
        attention probability (at most 1), so it never exceeds ``N``: adding
        ``N`` lifts the floor's tokens above every other token of every layer
        and head, and one threshold then keeps them before it shares out the
        rest of the budget.
        """
        seq_len = shared.shape[-1]
        floor = int(self.leverage_floor * kept_count(seq_len, self.compression_ratio))
        if floor == 0:
            return shared
        lifted = torch.zeros_like(shared).scatter_(-1, leverage.topk(floor, dim=-1).indices, float(seq_len))
        return shared + lifted

    def with_layer_floor(self, shared: torch.Tensor) -> torch.Tensor:
        """``shared`` scores with the layer's top ``layer_floor`` share of its uniform budget, over all its heads, first.

        The lift is ``N``, as for :meth:`with_leverage_floor`, applied after it
        (its lifted tokens are then among the layer's top). One threshold over
        every layer keeps the lifted tokens before it shares out the rest, so
        no layer keeps less than that share of its uniform budget, while the
        heads of a layer still share it by their scores.
        """
        b, heads, seq_len = shared.shape
        floor = int(self.layer_floor * kept_count(seq_len, self.compression_ratio)) * heads
        if floor == 0:
            return shared
        # The sinks, which the threshold keeps whatever their scores, count towards the floor.
        sinks = torch.arange(min(self.num_sinks, seq_len), device=shared.device)
        ranked = shared.index_fill(-1, sinks, float("inf")).reshape(b, heads * seq_len)
        lifted = torch.zeros_like(ranked).scatter_(-1, ranked.topk(floor, dim=-1).indices, float(seq_len))
        return shared + lifted.view(b, heads, seq_len)

    def context_attention(self, view: ScoringView) -> torch.Tensor:
        """:func:`peak_context_attention` of the view's context queries read back after the context, ``[B, H_kv, N]``.

        Query ``i`` is moved from position ``i`` to ``N + READ_BACK_GAP + i``,
        where KVzip's reconstruction pass asks for token ``i`` again: every
        key is then behind every query, at the distances the model was
        trained on, instead of ahead of the earlier queries at negative
        distances it never saw. Measured on RULER 2K multikey needles
        (Qwen2.5-Coder-0.5B, float32, 4 samples), the gold answer's NLL at
        50% / 70% went from 0.42 / 1.04 with the queries where they are to
        0.06 / 0.13, the full cache's 0.07 and KVzip's 0.06 / 0.11.

        With ``attention_queries=m`` only ``m`` queries, evenly spaced from the
        first context token to the last, are read back: the cost falls from
        ``N`` to ``m`` query rows per layer, and a key's peak is then the
        largest attention it gets from those ``m``.
        """
        queries = view.context_queries("layer_budget='context_attention'")
        if self.attention_queries is not None and self.attention_queries < view.seq_len:
            queries = queries[:, :, evenly_spaced(view.seq_len, self.attention_queries, queries.device)]
        try:
            read_back = rotate_by(queries, view.module, view.seq_len + READ_BACK_GAP)
        except ValueError as error:
            raise ValueError(f"{error}. layer_budget='context_attention' moves the context's queries after the "
                             "context through the model's RoPE") from error
        return peak_context_attention(read_back, view.keys, view.scaling)

    def combined(self, lk: torch.Tensor, lv: torch.Tensor) -> torch.Tensor:
        """Key and value leverage combined as ``leverage`` says, normalised."""
        if self.leverage == "key":
            return normalise(lk, self.local_window)
        if self.leverage == "value":
            return normalise(lv, self.local_window)
        if self.leverage == "kv_avg":
            return 0.5 * (normalise(lk, self.local_window) + normalise(lv, self.local_window))
        return normalise(lk * lv, self.local_window)
