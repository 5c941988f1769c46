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


def assert_window_is_hfs(model_dir, buffer, context_ids: list[int]) -> None:
    """The captured window ``[layers, W, H * D]`` holds the queries curdkv records in the HF model."""
    import torch

    import curdkv
    from curdkv.runtime.capture import capture_ids
    from curdkv.vllm.queries import layer_queries

    model, _ = curdkv.load_model(model_dir, dtype="float32", device="cpu")
    hf = capture_ids(model, torch.tensor([context_ids]), query_window=64).queries
    heads = model.config.num_attention_heads
    for layer, expected in enumerate(hf):
        torch.testing.assert_close(layer_queries(buffer, layer, heads), expected, atol=2e-3, rtol=1e-3)


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

    captured = {}
    queries = worker_connector(chunked)._queries
    take = queries.take
    queries.take = lambda req_id: captured.setdefault(req_id, take(req_id))
    start = free_blocks(chunked)
    tokenizer = chunked.get_tokenizer()
    prompts, contexts = zip(*(needle_prompt(tokenizer, i) for i in range(2)))
    params = [greedy(12, context_tokens=n) for n in contexts]
    connector.build_connector_meta = recording
    try:
        answers = texts(chunked.generate(list(prompts), params, use_tqdm=False))
    finally:
        del connector.build_connector_meta, queries.take
    first = next(iter(slices))  # needle 0's: scheduled first, its first chunk holds part of its window
    assert [p.stop - p.start for p in slices[first]] == [64 - SPLIT, SPLIT]
    assert_window_is_hfs(model_dir, captured[first], prompts[0]["prompt_token_ids"][: contexts[0]])
    assert answers == expected, (answers, expected)
    assert free_blocks(chunked) == start
    assert not connector._tracked and len(worker_connector(chunked)._queries) == 0
