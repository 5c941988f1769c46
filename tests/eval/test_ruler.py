"""RULER task generation: lengths, answers, determinism, RULER's exact wording, scoring, bad input.

Uses SmolLM2's tokenizer (from the bundled GGUF file, about 7 s to build
once), never the model.
"""

from __future__ import annotations

import collections
import importlib.util
import random
import re

import pytest

from curdkv.eval.data import ruler_data_dir
from curdkv.eval.ruler import (
    METRICS,
    NEEDLE_TASKS,
    RULER_CATEGORIES,
    RULER_TASKS,
    average,
    fit_size,
    ruler_samples,
    sample_score,
    score,
    score_sample,
)
from curdkv.eval.sample import EvalSample

LENGTHS = (1024, 2048, 4096)
PER_LENGTH = 2  # samples per (task, length) in the length test


@pytest.fixture(scope="module")
def tok(smollm2_tokenizer):
    return smollm2_tokenizer


_CACHE: dict = {}


def samples(tok, task, length=4096, n=PER_LENGTH, seed=0) -> list[EvalSample]:
    key = (task, length, n, seed)
    if key not in _CACHE:
        _CACHE[key] = ruler_samples(task, tok, length, n, seed=seed)
    return _CACHE[key]


# RULER's own code and data come from one package; tests that read them skip without it.
needs_ruler_package = pytest.mark.skipif(
    importlib.util.find_spec("long_context_eval") is None,
    reason="needs the package nvidia-long-context-eval (pip install --no-deps nvidia-long-context-eval==26.3)")


def ruler_constants():
    from long_context_eval.data.synthetic.constants import TASKS

    return TASKS


def prompt_tokens(tok, s: EvalSample) -> int:
    """What the module says it counts: chat prefix, context + question, chat suffix, answer prefix."""
    from curdkv.models import chat_parts

    head, tail = chat_parts(tok)
    text = head + s.context + s.question + tail + s.answer_prefix
    return len(tok(text, add_special_tokens=not head).input_ids)


# ---------------------------------------------------------------- task lists and RULER's definitions

@needs_ruler_package
def test_task_lists_follow_synthetic_yaml():
    yaml = pytest.importorskip("yaml")
    from curdkv.eval.ruler_tasks import TASK_ARGS

    config = yaml.safe_load((ruler_data_dir().parent.parent / "synthetic.yaml").read_text())
    assert list(RULER_TASKS) == list(config) and len(RULER_TASKS) == 13
    assert NEEDLE_TASKS == tuple(t for t in RULER_TASKS if t.startswith("niah_")) and len(NEEDLE_TASKS) == 8
    assert sorted(t for ts in RULER_CATEGORIES.values() for t in ts) == sorted(RULER_TASKS)
    for task, (family, args) in TASK_ARGS.items():
        assert (family, args) == (config[task]["task"], config[task]["args"]), task


@needs_ruler_package
def test_templates_are_rulers_cut_in_two():
    from curdkv.eval.ruler_tasks import TEMPLATES

    ruler = ruler_constants()
    assert set(TEMPLATES) == set(ruler)
    for family, t in TEMPLATES.items():
        assert t.context + t.question == ruler[family]["template"], family
        assert t.prefix == ruler[family]["answer_prefix"], family
        assert t.tokens_to_generate == ruler[family]["tokens_to_generate"], family


def _singular(text):  # RULER's niah.py wording of one-needle questions
    for old, new in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
        text = text.replace(old, new)
    return text


def test_niah_prompts_are_rulers_input(tok):
    niah = ruler_constants()["niah"]
    full = niah["template"] + niah["answer_prefix"]
    for task, template, kind in (("niah_multivalue", full, "numbers"), ("niah_single_2", _singular(full), "number"),
                                 ("niah_multikey_3", _singular(full), "uuid")):
        for s in samples(tok, task):
            haystack = s.context.split("afterwards.\n", 1)[1][:-1]
            query = re.search(r" for (.*) mentioned in the provided text\?$", s.question).group(1)
            expected = template.format(type_needle_v=kind, context=haystack, query=query)
            assert s.context + s.question + s.answer_prefix == expected, task
            assert s.question.startswith("What ") and s.question not in s.context


def test_other_prompts_are_rulers_input(tok):
    ruler = ruler_constants()

    def full(family, **kw):
        return (ruler[family]["template"] + ruler[family]["answer_prefix"]).format(**kw)

    for s in samples(tok, "vt"):
        main = s.context[s.context.rindex("Memorize and track"):]
        value = re.search(r"the value (\d+) in the text above\.$", s.question).group(1)
        noise = main.split("\n\n", 1)[1][:-1]
        assert main + s.question + s.answer_prefix == full("variable_tracking", context=noise, query=value, num_v=5)
        # RULER 26.3's few-shot example first: ' ' + solved example + '\n\n'
        assert s.context.startswith(" Memorize and track") and "they are:  " in s.context
    for s in samples(tok, "cwe"):
        main = s.context[s.context.rindex("Below is a numbered list"):]
        words = main.split("\n", 1)[1][:-1]
        assert main + s.question + s.answer_prefix == full("common_words_extraction", context=words, query="")
        assert s.context.startswith("Below is a numbered list") and "in the list are:1. " in s.context
    for s in samples(tok, "fwe"):
        coded = s.context.split("coded words. ", 1)[1][:-1]
        assert s.context + s.question + s.answer_prefix == full("freq_words_extraction", context=coded, query="")
    for task in ("qa_1", "qa_2"):
        for s in samples(tok, task):
            docs = s.context.split("given documents.\n\n", 1)[1][:-2]
            query = s.question.split("\n\nQuestion: ", 1)[1]
            assert s.context + s.question + s.answer_prefix == full("qa", context=docs, query=query)
            assert s.question.startswith("Answer the question based on the given documents.")


# ---------------------------------------------------------------- lengths

@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("task", RULER_TASKS)
def test_lengths(tok, task, length):
    got = samples(tok, task, length)
    assert len(got) == PER_LENGTH
    for s in got:
        total = prompt_tokens(tok, s) + s.max_new_tokens
        assert s.extra["prompt_tokens"] + s.max_new_tokens == total
        assert s.length == length and s.task == task
        # Sizes move by a sentence, line, list word or document: all end close below the length.
        # (A qa prompt at 1024 can end one long paragraph short; these seeds do not.)
        assert 0.85 * length <= total <= length, (task, length, total)


def test_speed_50_samples(tok):
    import time

    t = time.perf_counter()
    got = ruler_samples("niah_single_2", tok, 4096, 50)
    assert len(got) == 50 and time.perf_counter() - t < 10


# ---------------------------------------------------------------- answers are in the prompt

@pytest.mark.parametrize("task", NEEDLE_TASKS)
def test_niah_answers_in_context(tok, task):
    for s in samples(tok, task):
        assert s.metric == "string_match_all" and s.max_new_tokens == 128
        keys = re.search(r" for (.*) mentioned", s.question).group(1).replace(", and ", ", ").split(", ")
        needles = re.findall(r"One of the special magic \w+ for (\S+) is: (\S+)\.", s.context)
        found = collections.defaultdict(list)
        for k, v in needles:
            found[k].append(v)
        assert sorted(s.answers) == sorted(v for k in keys for v in found[k])
        assert len(s.answers) == (4 if task in ("niah_multivalue", "niah_multiquery") else 1)


def test_vt_chain_in_context(tok):
    for s in samples(tok, "vt"):
        names, value = s.answers, re.search(r"value (\d+)", s.question).group(1)
        assert len(names) == 5 and f"VAR {names[0]} = {value}" in s.context
        for a, b in zip(names, names[1:]):
            assert f"VAR {b} = VAR {a} " in s.context


def test_cwe_answers_are_the_most_common(tok):
    for length in (2048, 4096):
        for s in samples(tok, "cwe", length):
            main = s.context[s.context.rindex("Below is a numbered list"):]
            counts = collections.Counter(re.findall(r"\d+\. (\S+)", main))
            top = {w for w, _ in counts.most_common(10)}
            assert set(s.answers) == top and len(s.answers) == 10
            assert min(counts[w] for w in top) == (30 if length >= 4096 else 6)


def test_fwe_answers_are_the_most_frequent(tok):
    for s in samples(tok, "fwe"):
        counts = collections.Counter(s.context.split("coded words. ", 1)[1].split())
        del counts["..."]
        ranked = [w for w, _ in counts.most_common()]
        assert list(s.answers) == ranked[:3] and counts[ranked[2]] > counts[ranked[3]]


@pytest.mark.parametrize("task", ["qa_1", "qa_2"])
def test_qa_gold_paragraphs_in_context(tok, task):
    for length in (1024, 4096):
        for i, s in enumerate(samples(tok, task, length)):
            assert s.metric == "string_match_part" and s.max_new_tokens == 32
            assert s.extra["question_index"] == i  # dataset order, as RULER
            assert s.extra["gold_documents"]
            for doc in s.extra["gold_documents"]:
                assert f":\n{doc}\n\n" in s.context
            if task == "qa_1":
                assert any(a in s.context for a in s.answers)


# ---------------------------------------------------------------- determinism

@pytest.mark.parametrize("task", ["niah_single_1", "niah_multikey_1", "vt", "cwe", "fwe", "qa_2"])
def test_deterministic(tok, task):
    a = ruler_samples(task, tok, 1024, 3, seed=7)
    b = ruler_samples(task, tok, 1024, 3, seed=7)
    assert a == b and [x.extra for x in a] == [x.extra for x in b]
    assert ruler_samples(task, tok, 1024, 2, seed=7) == a[:2]  # a sample does not depend on num_samples
    c = ruler_samples(task, tok, 1024, 3, seed=8)
    assert all(x.context != y.context for x, y in zip(a, c))


# ---------------------------------------------------------------- scoring

def test_score_hand_computed():
    refs = [["123", "456"], ["Abc"], ["x", "y", "z", "w"]]
    preds = ["the numbers are 123 and 789", "ABC.", "X, then Z"]
    # all: (1/2 + 1 + 2/4) / 3 = 2/3
    assert score("string_match_all", preds, refs) == 66.67
    # part: (1 + 1 + 1) / 3
    assert score("string_match_part", preds, refs) == 100.0
    assert score("string_match_part", ["no", "abc"], [["yes"], ["b"]]) == 50.0
    assert score("string_match_all", ["  12\x003 "], [["3"]]) == 100.0  # control chars become newlines
    assert score("string_match_all", ["12\n3"], [["123"]]) == 0.0
    assert sample_score("string_match_all", "x y", ["x", "q", "y"]) == pytest.approx(200 / 3)
    s = EvalSample("qa_1", 0, "c", "q", ("Paris", "the city of Paris"), "string_match_part")
    assert score_sample(s, "paris") == 100.0 and score_sample(s, "Lyon") == 0.0
    assert average({t: 50.0 for t in NEEDLE_TASKS}, NEEDLE_TASKS) == 50.0


@needs_ruler_package
def test_score_matches_ruler():
    from long_context_eval.eval.synthetic.constants import string_match_all, string_match_part

    r = random.Random(0)
    words = ["alpha", "Beta", "gamma", "DELTA", "eps"]
    for _ in range(50):
        refs = [r.sample(words, r.randint(1, 4)) for _ in range(r.randint(1, 7))]
        preds = [" ".join(r.sample(words, r.randint(0, 5))).upper() for _ in refs]
        assert score("string_match_all", preds, refs) == string_match_all(preds, refs)
        assert score("string_match_part", preds, refs) == string_match_part(preds, refs)


# ---------------------------------------------------------------- bad input

def test_bad_input(tok):
    with pytest.raises(ValueError, match="task must be one of .*niah_single_1"):
        ruler_samples("niah", tok, 4096, 1)
    for n in (0, -1, 1.5):
        with pytest.raises(ValueError, match="num_samples"):
            ruler_samples("vt", tok, 4096, n)
    with pytest.raises(ValueError, match="length"):
        ruler_samples("vt", tok, 0, 1)
    for task in ("niah_single_2", "niah_multikey_3", "vt", "cwe", "fwe", "qa_1", "qa_2"):
        with pytest.raises(ValueError, match=r"length must be .* for task"):
            ruler_samples(task, tok, 150, 1)
    with pytest.raises(ValueError, match="metric must be one of"):
        score("exact", ["a"], [["a"]])
    with pytest.raises(ValueError, match="same length"):
        score("string_match_all", ["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="list of strings"):
        score("string_match_all", ["a"], ["a"])
    with pytest.raises(ValueError, match="missing"):
        average({"vt": 1.0}, RULER_TASKS)
    assert METRICS == ("string_match_all", "string_match_part")


def test_fit_size_finds_the_largest_fitting_size():
    r = random.Random(0)
    for _ in range(500):
        costs = [r.randint(1, 40)]
        for _ in range(499):
            costs.append(costs[-1] + r.randint(1, 40))
        budget = r.randint(costs[0], costs[-1] + 100)
        calls = []

        def measure(size):
            calls.append(size)
            return costs[size]

        size, tokens = fit_size(measure, budget, 0, 499, r.choice([None, r.randint(0, 499)]), r.uniform(1, 40))
        assert size == max(i for i, c in enumerate(costs) if c <= budget) and tokens == costs[size]
        assert len(calls) == len(set(calls)) < 30
    assert fit_size(lambda s: 10, 5, 0, 9) == (None, 10)
