"""Preemption with compression on: a pool too small for every request's decode forces vLLM to preempt and
recompute; each compressed request must answer as it does alone, and every block must come back."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm.config", reason="needs vLLM (make test-vllm)")

import curdkv.vllm  # noqa: E402
from engine_setup import close, free_blocks, make_llm, model_dir, scheduler_of  # noqa: E402,F401 (model_dir: a fixture)
from test_vllm_engine import needle_prompt  # noqa: E402

pytestmark = pytest.mark.real_model

# SmolLM2-135M in float32: 30 layers x 3 KV heads x 64 channels, keys and values, 128 tokens a block.
BLOCK_BYTES = 30 * 3 * 64 * 2 * 4 * 128
POOL_BLOCKS = 21  # one is vLLM's null block: 20 usable, 2560 tokens


@pytest.fixture(scope="module")
def small_pool(model_dir):
    llm = make_llm(model_dir, kv_transfer_config=curdkv.vllm.kv_transfer_config("curdkv", 0.5),
                   kv_cache_memory_bytes=POOL_BLOCKS * BLOCK_BYTES, max_model_len=2048)
    yield llm
    close(llm)


def test_preempted_compressed_requests_answer_as_alone(small_pool):
    """Four ~900-token prompts, compressed to ~4 blocks each, then 300 tokens each: 4 x 7 blocks > 20."""
    from vllm import SamplingParams

    tokenizer = small_pool.get_tokenizer()
    scheduler = scheduler_of(small_pool)
    start = free_blocks(small_pool)
    prompts, params = [], []
    for i in range(4):
        prompt, context_tokens = needle_prompt(tokenizer, i)
        prompts.append(prompt)
        params.append(SamplingParams(temperature=0, max_tokens=300, ignore_eos=True,
                                     extra_args=curdkv.vllm.request_options(context_tokens=context_tokens)))
    alone = [small_pool.generate([p], [s], use_tqdm=False)[0].outputs[0].token_ids for p, s in zip(prompts, params)]
    assert free_blocks(small_pool) == start

    preempted = []
    original = scheduler._preempt_request
    scheduler._preempt_request = lambda request, *a, **kw: (preempted.append(request.request_id),
                                                           original(request, *a, **kw))[1]
    try:
        together = [o.outputs[0].token_ids for o in small_pool.generate(prompts, params, use_tqdm=False)]
    finally:
        del scheduler._preempt_request
    assert preempted, "the pool was meant to be too small for all four decodes at once"
    assert together == alone
    assert free_blocks(small_pool) == start
    assert not scheduler.connector._tracked and not scheduler.connector._evicted
