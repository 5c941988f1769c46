"""The fused decode-step kernels against their PyTorch references (which copy transformers' modules)."""

from __future__ import annotations

import pytest
import torch

from conftest import INTERPRETED, KERNEL_DEVICE
from curdkv.kernels import decode_step as ds
from curdkv.kernels.common import interpreted_on_cpu

DTYPES = [torch.float32, torch.float16] + ([] if INTERPRETED else [torch.bfloat16])
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


@pytest.fixture(autouse=True)
def _kernel_routes(request):
    """Kernel tests on CPU run the kernels through Triton's interpreter (CPU tensors then take the kernel routes)."""
    if KERNEL_DEVICE == "cpu" and request.node.get_closest_marker("kernel"):
        with interpreted_on_cpu():
            yield
    else:
        yield


def close(a, b, dtype):
    return float((a.float() - b.float()).abs().max()) <= TOL[dtype] * max(1.0, float(b.float().abs().max()))


def test_references_match_transformers_modules():
    """The references are transformers' own RMSNorm, RoPE and gated activation, op for op."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

    g = torch.Generator().manual_seed(0)
    norm = LlamaRMSNorm(64, eps=1e-5).to(torch.bfloat16)
    norm.weight.data = torch.randn(64, generator=g).to(torch.bfloat16)
    x, d = torch.randn(3, 64, generator=g).to(torch.bfloat16), torch.randn(3, 64, generator=g).to(torch.bfloat16)
    expected = norm(x + d)
    summed = x.clone()
    assert torch.equal(ds.add_rmsnorm_reference(summed, d, norm.weight, 1e-5), expected)
    assert torch.equal(summed, x + d)
    q, k, v = (torch.randn(2, h, 16, generator=g).to(torch.bfloat16) for h in (4, 2, 2))
    cos, sin = torch.randn(2, 16, generator=g).to(torch.bfloat16), torch.randn(2, 16, generator=g).to(torch.bfloat16)
    q_hf, k_hf = apply_rotary_pos_emb(q[:, :, None], k[:, :, None], cos[:, None], sin[:, None])
    tail_k, tail_v = torch.zeros(2, 2, 5, 16, dtype=torch.bfloat16), torch.zeros(2, 2, 5, 16, dtype=torch.bfloat16)
    ds.rope_store_reference(q, k, v, cos, sin, tail_k, tail_v, torch.tensor([3]))
    assert torch.equal(q, q_hf[:, :, 0]) and torch.equal(tail_k[:, :, 3], k_hf[:, :, 0])
    assert torch.equal(tail_v[:, :, 3], v) and not tail_k[:, :, :3].any()


@pytest.mark.kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("delta", [True, False])
def test_add_rmsnorm_kernel(dtype, delta):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 200, generator=g).to(dtype)  # not a power of two: the masked tail of the block
    d = torch.randn(3, 200, generator=g).to(dtype) if delta else None
    w = torch.randn(200, generator=g).to(dtype)
    ref_x = x.clone()
    ref = ds.add_rmsnorm_reference(ref_x, d, w, 1e-6)
    dev_x = x.to(KERNEL_DEVICE)
    out = ds.add_rmsnorm(dev_x, None if d is None else d.to(KERNEL_DEVICE), w.to(KERNEL_DEVICE), 1e-6)
    assert close(out.cpu(), ref, dtype) and close(dev_x.cpu(), ref_x, dtype)


@pytest.mark.kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_norm", [False, True], ids=["rope", "qk-norm+rope"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_rope_store_kernel(dtype, head_norm, head_dim):
    g = torch.Generator().manual_seed(2)
    b, h, h_kv, cap = 2, 8, 2, 7
    q, k, v = (torch.randn(b, n, head_dim, generator=g).to(dtype) for n in (h, h_kv, h_kv))
    cos, sin = (torch.randn(b, head_dim, generator=g).to(dtype) for _ in range(2))
    qw = kw = None
    if head_norm:
        qw, kw = (torch.randn(head_dim, generator=g).to(dtype) for _ in range(2))
    index = torch.tensor([4])
    ref_q, ref_tk, ref_tv = q.clone(), torch.zeros(b, h_kv, cap, head_dim, dtype=dtype), torch.zeros(
        b, h_kv, cap, head_dim, dtype=dtype)
    ds.rope_store_reference(ref_q, k, v, cos, sin, ref_tk, ref_tv, index, qw, kw, 1e-6)
    dev = KERNEL_DEVICE
    out_q, tk, tv = q.to(dev), ref_tk.new_zeros(ref_tk.shape).to(dev), ref_tv.new_zeros(ref_tv.shape).to(dev)
    ds.rope_store(out_q, k.to(dev), v.to(dev), cos.to(dev), sin.to(dev), tk, tv, index.to(dev),
                  None if qw is None else qw.to(dev), None if kw is None else kw.to(dev), 1e-6)
    assert close(out_q.cpu(), ref_q, dtype) and close(tk.cpu(), ref_tk, dtype) and torch.equal(tv.cpu(), ref_tv)


@pytest.mark.kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_silu_mul_kernel(dtype):
    g = torch.Generator().manual_seed(3)
    gate, up = (torch.randn(2, 3000, generator=g).to(dtype) * 4 for _ in range(2))
    out = ds.silu_mul(gate.to(KERNEL_DEVICE), up.to(KERNEL_DEVICE))
    assert close(out.cpu(), ds.silu_mul_reference(gate, up), dtype)
