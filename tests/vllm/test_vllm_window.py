"""SnapKV inside vLLM with the context prefilled in chunks, the observation window split between two of
them: the same answers as curdkv's own path, every block and captured query given back."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm.config", reason="needs vLLM (make test-vllm)")

import curdkv.vllm  # noqa: E402
from engine_setup import close, free_blocks, make_llm, model_dir, scheduler_of, worker_connector  # noqa: E402,F401
from test_vllm_engine import curdkv_answers, greedy, needle_prompt, texts  # noqa: E402

pytestmark = pytest.mark.real_model
SPLIT = 30  # the window's last tokens, prefilled a chunk after the rest of the context


@pytest.fixture(scope="module")
def chunked(model_dir):
    """An engine whose token budget per step ends needle 0's first chunk ``SPLIT`` tokens before its context."""
    from transformers import AutoTokenizer

    _, context_tokens = needle_prompt(AutoTokenizer.from_pretrained(model_dir), 0)
    llm = make_llm(model_dir, kv_transfer_config=curdkv.vllm.kv_transfer_config("snapkv", 0.5),
                   max_num_batched_tokens=context_tokens - SPLIT)
    yield llm
    close(llm)


def test_a_window_split_across_prefill_chunks_answers_as_curdkv(chunked, model_dir):
    expected = curdkv_answers(model_dir, "snapkv", 0.5)
    connector = scheduler_of(chunked).connector
    slices: dict[str, list] = {}
    original = connector.build_connector_meta

    def recording(scheduler_output):
        meta = original(scheduler_output)
        for req_id, part in meta.windows.items():
            slices.setdefault(req_id, []).append(part)
        return meta

    start = free_blocks(chunked)
    tokenizer = chunked.get_tokenizer()
    prompts, params = [], []
    for i in range(2):
        prompt, context_tokens = needle_prompt(tokenizer, i)
        prompts.append(prompt)
        params.append(greedy(12, context_tokens=context_tokens))
    connector.build_connector_meta = recording
    try:
        answers = texts(chunked.generate(prompts, params, use_tqdm=False))
    finally:
        del connector.build_connector_meta
    split = [parts for parts in slices.values() if len(parts) == 2]
    assert split and [p.stop - p.start for p in split[0]] == [64 - SPLIT, SPLIT]
    assert answers == expected
    assert free_blocks(chunked) == start
    assert not connector._tracked and len(worker_connector(chunked)._queries) == 0
