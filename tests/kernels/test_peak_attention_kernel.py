"""The Triton peak-attention kernel against a slow obvious one.

Runs on CUDA, or on CPU through Triton's interpreter when Triton is
installed and ``TRITON_INTERPRET=1`` is set.
"""

import pytest
import torch

from curdkv.kernels.common import interpreted_on_cpu
from curdkv.kernels.peak_attention import peak_attention, peak_supported
from curdkv.presses.peak_attention import peak_context_attention
from conftest import INTERPRETED
from conftest import KERNEL_DEVICE as DEVICE

pytestmark = pytest.mark.kernel


def reference(queries, keys, scaling):
    """Every query against every key of its KV head, float64, softmax per query; each key's largest probability."""
    b, h = queries.shape[:2]
    h_kv = keys.shape[1]
    group = h // h_kv
    out = torch.zeros(b, h_kv, keys.shape[2], dtype=torch.float64)
    for i in range(b):
        for head in range(h):
            logits = queries[i, head].double() @ keys[i, head // group].double().T * scaling
            out[i, head // group] = torch.maximum(out[i, head // group], logits.softmax(-1).amax(0))
    return out


def half_inputs(b, h, m, h_kv, n, d, seed):
    gen = torch.Generator().manual_seed(seed)
    queries = (torch.randn(b, h, m, d, generator=gen) * 2).half()
    keys = torch.randn(b, h_kv, n, d, generator=gen).half()
    return queries, keys


@pytest.mark.parametrize("b,h,m,h_kv,n,d", [
    (1, 4, 100, 2, 150, 16),  # GQA groups of 2; neither length a multiple of a block
    (2, 2, 64, 2, 64, 32),  # batch 2, no grouping
    (1, 2, 256, 1, 256, 16),  # whole blocks, several of each in both passes
    (1, 4, 300, 2, 260, 32),  # several blocks in both passes, the last of each partial
    (1, 3, 1, 1, 200, 16),  # one query: its softmax alone
    (1, 1, 130, 1, 5, 64),  # fewer keys than a block
])
def test_equals_reference(b, h, m, h_kv, n, d):
    queries, keys = half_inputs(b, h, m, h_kv, n, d, seed=m + n)
    got = peak_attention(queries.to(DEVICE), keys.to(DEVICE), 0.3).cpu()
    assert got.shape == (b, h_kv, n) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), reference(queries, keys, 0.3), rtol=1e-3, atol=1e-4)


def test_one_spike_is_the_peak_of_its_key_alone():
    # One query that attends almost only to key 7: key 7's peak is ~1, whatever the other queries do.
    queries, keys = half_inputs(1, 2, 70, 1, 90, 16, seed=3)
    queries[0, 1, 40] = keys[0, 0, 7] * 4
    got = peak_attention(queries.to(DEVICE), keys.to(DEVICE), 1.0).cpu()
    assert float(got[0, 0, 7]) > 0.99
    torch.testing.assert_close(got.double(), reference(queries, keys, 1.0), rtol=1e-3, atol=1e-4)


@pytest.mark.skipif(not INTERPRETED, reason="routes CPU tensors through the interpreter")
def test_peak_context_attention_takes_the_kernel_for_a_half_cache():
    queries, keys = half_inputs(1, 4, 80, 2, 120, 16, seed=5)
    plain = peak_context_attention(queries.float(), keys.float(), 0.25)  # CPU: the chunked float32 route
    with interpreted_on_cpu():
        routed = peak_context_attention(queries.float(), keys, 0.25)
        chunked = peak_context_attention(queries.float(), keys, 0.25, chunk_size=16)  # chunk_size keeps the torch route
    torch.testing.assert_close(routed, peak_attention(queries, keys, 0.25))
    torch.testing.assert_close(routed, plain, rtol=2e-3, atol=1e-4)
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-7)


def test_unsupported_inputs_name_what_is_allowed():
    queries, keys = half_inputs(1, 2, 8, 1, 8, 16, seed=0)
    assert peak_supported(queries, keys)
    assert not peak_supported(queries.float(), keys.float())  # float32 would round to TF32 in the dot
    assert not peak_supported(queries[..., :12], keys[..., :12])
    assert not peak_supported(queries, keys.repeat(1, 3, 1, 1))  # 2 query heads cannot share 3 KV heads
    with pytest.raises(ValueError, match="power-of-two head dim"):
        peak_attention(queries.float(), keys.float(), 1.0)
