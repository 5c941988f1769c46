"""The Triton top-k selection against a slow obvious one.

Runs on CUDA, or on CPU through Triton's interpreter when Triton is
installed and ``TRITON_INTERPRET=1`` is set.
"""

import pytest
import torch

from curdkv.kernels import topk
from curdkv.selection import adaptive_by_kernels, select_adaptive, select_uniform
from conftest import KERNEL_DEVICE as DEVICE
from helpers import slow_adaptive

pytestmark = pytest.mark.kernel


def reference(scores: torch.Tensor, k: int, sinks: int = 0, recent: int = 0) -> torch.Tensor:
    """Each row's k best (protected first, then by score, ties to the earlier position), ascending."""
    b, h, n = scores.shape
    out = torch.empty(b, h, k, dtype=torch.int64)
    for i in range(b):
        for j in range(h):
            row = scores[i, j].double().tolist()
            protected = [p < sinks or p >= n - recent for p in range(n)]
            order = sorted(range(n), key=lambda p: (not protected[p], -row[p], p))
            out[i, j] = torch.tensor(sorted(order[:k]))
    return out


def run(scores: torch.Tensor, k: int, sinks: int = 0, recent: int = 0) -> torch.Tensor:
    return topk.topk_in_order(scores.to(DEVICE), k, sinks, recent).cpu()


@pytest.mark.parametrize("b,h,n,k,sinks,recent", [
    (1, 2, 3000, 1500, 4, 0),  # several programs per head, the last one partly empty
    (2, 3, 5000, 17, 4, 8),
    (1, 1, 1024, 1024, 0, 0),  # keep everything
    (1, 2, 2500, 1, 0, 0),
    (1, 1, 40000, 9000, 0, 64),  # more programs than heads need, chunks of several blocks
])
def test_equals_reference_on_distinct_scores(b, h, n, k, sinks, recent):
    scores = torch.randn(b, h, n, generator=torch.Generator().manual_seed(n + k))
    assert torch.equal(run(scores, k, sinks, recent), reference(scores, k, sinks, recent))


def test_ties_go_to_the_earlier_token():
    # Four distinct values over 6000 tokens: the threshold value is shared by ~1500 tokens in several programs.
    scores = torch.randint(0, 4, (2, 2, 6000), generator=torch.Generator().manual_seed(1)).float()
    assert torch.equal(run(scores, 2000), reference(scores, 2000))
    constant = torch.zeros(1, 1, 3000)
    assert torch.equal(run(constant, 700), torch.arange(700).reshape(1, 1, -1))


def test_sign_zero_and_infinities_rank_as_floats():
    gen = torch.Generator().manual_seed(2)
    scores = torch.randn(1, 2, 4000, generator=gen) * 1e-30  # tiny values: many share high digits
    scores[0, 0, :300] = -torch.rand(300, generator=gen) * 1e30
    scores[0, 1, 100:110] = float("inf")
    scores[0, 1, 200:210] = float("-inf")
    got = run(scores, 1234, sinks=3, recent=5)
    assert torch.equal(got, reference(scores, 1234, sinks=3, recent=5))
    # A press scoring +inf never displaces a protected token.
    scores = torch.full((1, 1, 2000), float("inf"))
    assert torch.equal(run(scores, 10, sinks=4, recent=2)[0, 0], torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 1998, 1999]))


def test_select_uniform_takes_the_kernel_with_the_same_checks():
    scores = torch.randn(1, 2, 3000, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    if DEVICE == "cuda":  # select_uniform routes to the kernel on CUDA only
        assert torch.equal(select_uniform(scores, 900, 4, 16).cpu(), reference(scores.cpu(), 900, 4, 16))
    with pytest.raises(ValueError, match="budget"):
        select_uniform(scores, 10, 4, 16)
    with pytest.raises(ValueError, match="NaN"):
        select_uniform(torch.full_like(scores, float("nan")), 900)


@pytest.mark.parametrize("alpha", [0.0, 0.2, 0.5, 1.0])
@pytest.mark.parametrize("sinks,recent", [(0, 0), (4, 0), (2, 6)])
def test_adaptive_selection_by_kernels_equals_the_slow_reference(alpha, sinks, recent):
    gen = torch.Generator().manual_seed(5)
    b, h, n, n_keep = 2, 3, 1500, 400  # a shared row of 4500 scores: several programs
    # Heads on different scales (the shared budget moves between them), with ties inside and across heads.
    scores = (torch.rand(b, h, n, generator=gen) * 64).round() * torch.tensor([1.0, 4.0, 0.25])[None, :, None]
    safeguard = int(alpha * n_keep + 1e-9)
    keep = adaptive_by_kernels(scores.to(DEVICE), n_keep, safeguard, sinks, recent).cpu()
    assert torch.equal(keep, slow_adaptive(scores, n_keep, alpha, sinks, recent))
    assert (keep.sum((1, 2)) == h * n_keep).all()
    # Scores laid out head-last (a transposed view) give the same choice, and are left as they were.
    strided = scores.transpose(1, 2).contiguous().to(DEVICE).transpose(1, 2)
    before = strided.clone()
    assert torch.equal(adaptive_by_kernels(strided, n_keep, safeguard, sinks, recent).cpu(), keep)
    assert torch.equal(strided, before)


def test_adaptive_kernels_keep_the_budget_when_the_rest_is_minus_infinity():
    # Head 1 scores -inf everywhere; the shared pass must still find new tokens, not the safeguard's again.
    scores = torch.randn(1, 2, 2000, generator=torch.Generator().manual_seed(6))
    scores[0, 1] = float("-inf")
    scores[0, 0, 1000:] = float("-inf")
    keep = adaptive_by_kernels(scores.to(DEVICE), 1200, 240, 4, 0).cpu()
    assert int(keep.sum()) == 2400
    assert torch.equal(keep, slow_adaptive(scores, 1200, 0.2, 4, 0))


def test_select_adaptive_takes_the_kernels_with_the_same_checks():
    scores = torch.randn(1, 2, 3000, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    if DEVICE == "cuda":  # select_adaptive routes to the kernels on CUDA only
        assert torch.equal(select_adaptive(scores, 900, 0.2, 4, 16).cpu(), slow_adaptive(scores.cpu(), 900, 0.2, 4, 16))
    with pytest.raises(ValueError, match="budget"):
        select_adaptive(scores, 10, 0.2, 4, 16)
    with pytest.raises(ValueError, match="NaN"):
        select_adaptive(torch.full_like(scores, float("nan")), 900, 0.2)


def test_refuses_bad_k_and_shapes():
    scores = torch.randn(1, 1, 100).to(DEVICE)
    for k in (0, 101):
        with pytest.raises(ValueError, match="k must be in"):
            topk.topk_in_order(scores, k)
    with pytest.raises(ValueError, match="scores must be"):
        topk.topk_in_order(scores[0], 5)
