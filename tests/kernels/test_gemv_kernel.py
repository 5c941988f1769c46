"""The grouped and gated GEMV kernels against ``x @ W.T`` computed in float32."""

from __future__ import annotations

import pytest
import torch

from conftest import INTERPRETED, KERNEL_DEVICE
from curdkv.kernels import gemv
from curdkv.kernels.decode_step import silu_mul_reference
from test_decode_step_kernels import _kernel_routes  # noqa: F401 (an autouse fixture: kernels interpreted on CPU)

DTYPES = [torch.float16] + ([] if INTERPRETED else [torch.bfloat16])
TOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2}  # of the largest output: one rounding to the dtype, and then some


def randn(*shape, g, dtype):
    return torch.randn(*shape, generator=g).to(dtype)


def close(out, ref, dtype):
    return float((out.float().cpu() - ref).abs().max()) <= TOL[dtype] * float(ref.abs().max())


@pytest.mark.kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", [1, 3, 16])
@pytest.mark.parametrize("k", [200, 512])  # 200: not a multiple of any block (the masked tail of the loop)
@pytest.mark.parametrize("sizes", [(40,), (24, 9), (40, 9, 17)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("bias", [False, True])
def test_grouped_gemv_matches_float32_products(dtype, rows, k, sizes, bias):
    g = torch.Generator().manual_seed(rows * 1000 + k + len(sizes))
    x = randn(rows, k, g=g, dtype=dtype)
    ws = [randn(n, k, g=g, dtype=dtype) for n in sizes]
    bs = [randn(n, g=g, dtype=dtype) for n in sizes] if bias else None
    dev = KERNEL_DEVICE
    outs = gemv.grouped_gemv(x.to(dev), [w.to(dev) for w in ws], None if bs is None else [b.to(dev) for b in bs])
    assert len(outs) == len(sizes)
    for i, (out, w) in enumerate(zip(outs, ws)):
        ref = x.float() @ w.float().T + (bs[i].float() if bias else 0)
        assert out.shape == (rows, w.shape[0]) and out.dtype == dtype and out.is_contiguous()
        assert close(out, ref, dtype), (i, float((out.float().cpu() - ref).abs().max()))


@pytest.mark.kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,k,n", [(1, 200, 40), (1, 256, 33), (4, 200, 24)])
@pytest.mark.parametrize("bias", [False, True])
def test_gated_gemv_matches_silu_of_the_float32_products(dtype, rows, k, n, bias):
    g = torch.Generator().manual_seed(7 + rows + k)
    x, wg, wu = randn(rows, k, g=g, dtype=dtype), randn(n, k, g=g, dtype=dtype), randn(n, k, g=g, dtype=dtype)
    bg, bu = (randn(n, g=g, dtype=dtype), randn(n, g=g, dtype=dtype)) if bias else (None, None)
    dev = KERNEL_DEVICE
    out = gemv.gated_gemv(x.to(dev), wg.to(dev), wu.to(dev), *(None if b is None else b.to(dev) for b in (bg, bu)))
    gate, up = x.float() @ wg.float().T, x.float() @ wu.float().T
    if bias:
        gate, up = gate + bg.float(), up + bu.float()
    assert out.shape == (rows, n) and close(out, silu_mul_reference(gate, up), dtype)


@pytest.mark.kernel
def test_outside_the_kernels_reach_the_products_are_torchs():
    g = torch.Generator().manual_seed(3)
    dev = KERNEL_DEVICE
    w = randn(8, 32, g=g, dtype=torch.float16).to(dev)
    for x in (randn(1, 32, g=g, dtype=torch.float32).to(dev), randn(17, 32, g=g, dtype=torch.float16).to(dev)):
        wx = w.to(x.dtype)
        assert not gemv.gemv_applies(x, [wx])
        assert torch.equal(gemv.grouped_gemv(x, [wx])[0], torch.nn.functional.linear(x, wx))
    with pytest.raises(ValueError, match="1 to 3 weights"):
        gemv.grouped_gemv(w[:1], [w] * 4)
    with pytest.raises(ValueError, match="every weight or for none"):
        gemv.grouped_gemv(w[:1].contiguous(), [w, w], [None, w[0]])
