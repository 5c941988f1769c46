"""Context-calibrated compression: the compression ratio chosen per context (Compactor, arXiv 2507.08143).

Compactor's second contribution: the loss of a true answer's likelihood when
a context keeps a fraction ``r`` of its tokens is predicted from the
context's own NLL under the model (:class:`CalibrationCurve`, fitted per
model and press by :func:`fit_calibration` on ratios measured with
:func:`nll_ratio`), and each context is compressed as far as the prediction
stays within a tolerance (:func:`calibrated_ratio`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .base import check_float

# |b| of the calibration curve is clamped here: at 60 the curve is already
# exp(60 (r - 1)) to float64 precision, and expm1 stays far from overflow.
MAX_SHARPNESS = 60.0


def _check_tolerance(tolerance) -> float:
    ok = not isinstance(tolerance, bool) and isinstance(tolerance, (int, float)) and 0.0 <= tolerance < 1.0
    if not ok:
        raise ValueError(
            f"tolerance must be a float in [0, 1) (the allowed relative loss of the answer's likelihood, "
            f"1 - tau in the paper; 0.05 for tau = 0.95), got {tolerance!r}"
        )
    return float(tolerance)


def _curve(retention: torch.Tensor, sharpness: torch.Tensor) -> torch.Tensor:
    """``expm1(b r) / expm1(b)``, with its Taylor form ``r + b r (r - 1) / 2`` near ``b = 0`` (differentiable)."""
    b = sharpness.clamp(-MAX_SHARPNESS, MAX_SHARPNESS)
    small = b.abs() < 1e-4
    safe = torch.where(small, torch.ones_like(b), b)
    exact = torch.expm1(safe * retention) / torch.expm1(safe)
    return torch.where(small, retention + b * retention * (retention - 1) / 2, exact)


@dataclass(frozen=True)
class CalibrationCurve:
    """The paper's curve of answer-likelihood kept against tokens kept, for one model and press.

    With ``b = alpha * NLL(c) + beta`` (``NLL(c)``: the context's token-averaged
    negative log-likelihood under the model), the predicted NLL ratio
    ``NLL(answer | full context) / NLL(answer | context compressed to keep r)``
    is ``f(r) = (exp(r b - b) - exp(-b)) / (1 - exp(-b)) = expm1(b r) / expm1(b)``:
    1 when nothing is evicted, 0 for an empty cache, increasing in ``r``. ``b``
    is clamped to ``±MAX_SHARPNESS``.
    """

    alpha: float
    beta: float

    def __post_init__(self) -> None:
        check_float("alpha", self.alpha, -math.inf)
        check_float("beta", self.beta, -math.inf)

    def sharpness(self, context_nll: float) -> float:
        return min(max(self.alpha * float(context_nll) + self.beta, -MAX_SHARPNESS), MAX_SHARPNESS)

    def quality(self, retention: float, context_nll: float) -> float:
        """Predicted NLL ratio when a fraction ``retention`` of the tokens is kept."""
        if isinstance(retention, bool) or not isinstance(retention, (int, float)) or not 0.0 <= retention <= 1.0:
            raise ValueError(f"retention must be a float in [0, 1], got {retention!r}")
        b = torch.tensor(self.sharpness(context_nll), dtype=torch.float64)
        return float(_curve(torch.tensor(float(retention), dtype=torch.float64), b))

    def retention(self, context_nll: float, tolerance: float) -> float:
        """The smallest fraction of tokens kept whose predicted NLL ratio is at least ``1 - tolerance``.

        The curve inverted in closed form: ``r = log1p(tau expm1(b)) / b`` with
        ``tau = 1 - tolerance``.
        """
        tolerance = _check_tolerance(tolerance)
        if tolerance == 0.0:
            return 1.0
        tau, b = 1.0 - tolerance, self.sharpness(context_nll)
        if abs(b) < 1e-12:
            r = tau
        elif b > 0:
            r = math.log1p(tau * math.expm1(b)) / b
        else:  # log(1 + tau expm1(b)) = log(tolerance + tau exp(b)): two positive terms, no cancellation
            r = math.log(tolerance + tau * math.exp(b)) / b
        return min(max(r, 0.0), 1.0)


def _finite_nlls(context_nll) -> torch.Tensor:
    nlls = torch.as_tensor(context_nll, dtype=torch.float64).detach().flatten().cpu()
    if nlls.numel() == 0 or not bool(torch.isfinite(nlls).all()):
        raise ValueError(f"context_nll must be one or more finite numbers, got {context_nll!r}")
    return nlls


def calibrated_ratio(curve: CalibrationCurve, context_nll, tolerance: float = 0.05) -> float:
    """The paper's context-calibrated compression ratio, in ``[0, 1)``.

    ``1 - r*`` with ``r*`` the smallest fraction of tokens kept whose predicted
    NLL ratio (:class:`CalibrationCurve`) is at least ``1 - tolerance``. The
    paper's budgets are tau = 0.95 (Llama 3.1) and 0.90 (Qwen 2.5), i.e.
    ``tolerance`` 0.05 and 0.10. ``context_nll`` is a float or a tensor of one
    NLL per batch element; a batch, compressed at one ratio, gets its most
    cautious element's ratio (the largest ``r*``).
    """
    if not isinstance(curve, CalibrationCurve):
        raise ValueError(f"curve must be a CalibrationCurve (from fit_calibration), got {type(curve).__name__}")
    tolerance = _check_tolerance(tolerance)
    keep = max(curve.retention(float(x), tolerance) for x in _finite_nlls(context_nll))
    # A ratio of exactly 1 would keep nothing; the runtime keeps at least one token anyway.
    return min(1.0 - keep, math.nextafter(1.0, 0.0))


def fit_calibration(retention, context_nll, quality_ratio, underestimate_weight: float = 4.0) -> CalibrationCurve:
    """Fit ``alpha, beta`` of :class:`CalibrationCurve` to measured ``(r, NLL(c), y)`` triples.

    ``y`` is the NLL ratio of a true answer measured at retention ``r``
    (:func:`nll_ratio`). Least squares, weighted by ``underestimate_weight``
    where the curve predicts a better ratio than measured: there the curve
    would keep too few tokens, the costlier error (the paper's asymmetric
    MSE; the default weight of 4 is this library's, the paper's is not
    reproduced here). A grid over a constant ``b`` starts L-BFGS over both
    parameters, in float64.
    """
    r, nll, y = (torch.as_tensor(v, dtype=torch.float64).detach().flatten().cpu()
                 for v in (retention, context_nll, quality_ratio))
    if not (r.numel() == nll.numel() == y.numel() >= 2):
        raise ValueError(
            f"retention, context_nll and quality_ratio must be equally long with at least 2 triples, "
            f"got {r.numel()}, {nll.numel()}, {y.numel()}"
        )
    for name, v in (("retention", r), ("context_nll", nll), ("quality_ratio", y)):
        if not bool(torch.isfinite(v).all()):
            raise ValueError(f"{name} must be finite numbers")
    if bool(((r < 0) | (r > 1)).any()):
        raise ValueError("retention must be in [0, 1]")
    check_float("underestimate_weight", underestimate_weight, 1.0)
    centre = float(nll.mean())  # b = alpha (nll - centre) + beta' keeps the two parameters decoupled

    def loss(params: torch.Tensor) -> torch.Tensor:
        residual = _curve(r, params[0] * (nll - centre) + params[1]) - y
        weight = torch.where(residual > 0, float(underestimate_weight), 1.0)
        return (weight * residual.square()).mean()

    grid = torch.linspace(-MAX_SHARPNESS, MAX_SHARPNESS, 481, dtype=torch.float64)
    start = min(grid, key=lambda b: float(loss(torch.stack([torch.zeros((), dtype=torch.float64), b]))))
    params = torch.tensor([0.0, float(start)], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [params], lr=1.0, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-15, line_search_fn="strong_wolfe"
    )

    def closure():
        optimizer.zero_grad()
        value = loss(params)
        value.backward()
        return value

    with torch.enable_grad():
        optimizer.step(closure)
    alpha, shifted = (float(p) for p in params.detach())
    return CalibrationCurve(alpha, shifted - alpha * centre)


