"""LongBench loader, prompt split, middle truncation and metrics, on small fixture files (offline).

Expected metric values are worked out by hand in the comments; they were also
checked against LongBench's own metrics.py (with rouge 1.0.1, jieba 0.42.1 and
fuzzywuzzy 0.18.0) when this was written.
"""

from __future__ import annotations

import json
import math
import sys

import pytest

from curdkv.eval import longbench as lb
from curdkv.eval import longbench_metrics as lm

TREC_CLASSES = ["Abbreviation", "Entity", "Other entity", "Location", "City", "Country"]

RECORDS = {
    "narrativeqa": [
        {"input": "Who wrote the letter?", "context": "Once upon a time Anna wrote a letter to Bob. " * 20,
         "answers": ["Anna", "Anna Karenina"], "length": 180, "dataset": "narrativeqa", "language": "en",
         "all_classes": None, "_id": "n0"},
        {"input": "Where did they meet?", "context": "They met in Paris.", "answers": ["in Paris"], "length": 4,
         "dataset": "narrativeqa", "language": "en", "all_classes": None, "_id": "n1"},
    ],
    "gov_report": [
        {"input": "", "context": "The agency spent more money. It plans cuts.", "answers": ["Spending rose."],
         "length": 8, "dataset": "gov_report", "language": "en", "all_classes": None, "_id": "g0"},
    ],
    "trec": [
        {"input": "Question: What city hosts the Louvre ?\nType:",
         "context": "Question: What is NASA short for ?\nType: Abbreviation\nQuestion: Where is Lyon ?\nType: City",
         "answers": ["City"], "length": 20, "dataset": "trec", "language": "en", "all_classes": TREC_CLASSES,
         "_id": "t0"},
    ],
    "lsht": [
        {"input": "新闻：球队昨晚赢得冠军。\n类别：", "context": "新闻：股市上涨。\n类别：财经\n新闻：比赛结束。\n类别：体育",
         "answers": ["体育"], "length": 30, "dataset": "lsht", "language": "zh", "all_classes": ["体育", "财经"],
         "_id": "l0"},
    ],
    "multifieldqa_zh": [
        {"input": "会议在哪里举行？", "context": "会议于五月在北京举行。", "answers": ["北京"], "length": 11,
         "dataset": "multifieldqa_zh", "language": "zh", "all_classes": None, "_id": "z0"},
    ],
    "vcsum": [
        {"input": "", "context": "张三：我们讨论进度。", "answers": ["会议讨论了进度。"], "length": 10,
         "dataset": "vcsum", "language": "zh", "all_classes": None, "_id": "v0"},
    ],
    "lcc": [
        {"input": "", "context": "def add(a, b):\n", "answers": ["    return a + b"], "length": 3,
         "dataset": "lcc", "language": "python", "all_classes": None, "_id": "c0"},
    ],
    "passage_retrieval_en": [
        {"input": "An abstract about rivers.", "context": "Paragraph 1: Lakes.\n\nParagraph 2: Rivers.",
         "answers": ["Paragraph 2"], "length": 6, "dataset": "passage_retrieval_en", "language": "en",
         "all_classes": None, "_id": "p0"},
    ],
    "qasper_e": [
        {"input": "Q1?", "context": "short", "answers": ["yes"], "length": 1000, "dataset": "qasper",
         "language": "en", "all_classes": None, "_id": "e0"},
        {"input": "Q2?", "context": "medium", "answers": ["no"], "length": 5000, "dataset": "qasper",
         "language": "en", "all_classes": None, "_id": "e1"},
        {"input": "Q3?", "context": "long", "answers": ["unanswerable"], "length": 9000, "dataset": "qasper",
         "language": "en", "all_classes": None, "_id": "e2"},
    ],
}


class CharTokenizer:
    """One token per character (id = code point): exact round trips, so token counts are character counts."""

    def encode(self, text, add_special_tokens=True):
        return [ord(c) for c in text]

    def __call__(self, text, add_special_tokens=True):
        return type("Encoding", (), {"input_ids": self.encode(text)})()

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(i) for i in ids)


@pytest.fixture
def data_dir(tmp_path):
    for task, records in RECORDS.items():
        with open(tmp_path / f"{task}.jsonl", "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return tmp_path


def _prompt(task, record):
    return lb.PROMPTS[task.removesuffix("_e")].format(**record)


# ---------------------------------------------------------------------------------------------- prompts


def test_tables_cover_all_21_tasks_and_split_back_to_the_prompt():
    assert len(lb.TASKS) == 21
    assert set(lb.TASKS) == set(lb.MAX_NEW_TOKENS) == set(lb.TASK_METRICS)
    assert set(lb.TASK_METRICS.values()) <= set(lm.METRICS)
    assert set(lb.E_TASKS) < set(lb.TASKS) and len(lb.E_TASKS) == 13
    for task in lb.TASKS:
        context, question, cue = lb.split_template(task)
        assert context + question + cue == lb.PROMPTS[task]
        assert "{context}" in context and "{input}" not in context


@pytest.mark.parametrize("task", sorted(RECORDS))
def test_context_question_and_prefix_reproduce_longbench_prompt(data_dir, task):
    samples = lb.longbench_samples(data_dir, task)
    assert len(samples) == len(RECORDS[task])
    for i, (sample, record) in enumerate(zip(samples, RECORDS[task])):
        base = task.removesuffix("_e")
        assert sample.context + sample.question + sample.answer_prefix == _prompt(task, record)
        assert sample.question.strip(), "the runtime refuses an empty question"
        assert sample.task == task and sample.index == i
        assert sample.answers == tuple(record["answers"])
        assert sample.metric == lb.TASK_METRICS[base]
        assert sample.max_new_tokens == lb.MAX_NEW_TOKENS[base]
        assert sample.length == 0 and sample.extra["truncated"] is False
        assert sample.extra["longbench_length"] == record["length"]
        assert sample.extra["id"] == record["_id"] and sample.extra["language"] == record["language"]
        assert sample.extra["chat_template"] == (base not in lb.NO_CHAT_TASKS)
        assert record["context"] in sample.context


def test_split_per_task_family(data_dir):
    (nqa, _), (gov,), (trec,), (zh,), (vc,), (lcc,), (ret,) = (
        lb.longbench_samples(data_dir, t)
        for t in ("narrativeqa", "gov_report", "trec", "multifieldqa_zh", "vcsum", "lcc", "passage_retrieval_en")
    )
    # QA: the question starts at "Question:"; the repeated instruction stays in the compressed context.
    assert nqa.question == "Question: Who wrote the letter?\n\n" and nqa.answer_prefix == "Answer:"
    assert nqa.context.endswith("Do not provide any explanation.\n\n")
    assert zh.question == "问题：会议在哪里举行？\n" and zh.answer_prefix == "回答："
    # No question: the trailing instruction is asked.
    assert gov.question == "Now, write a one-page summary of the report.\n\n" and gov.answer_prefix == "Summary:"
    # Few-shot: the new example is the question, its trailing label cue the answer prefix.
    assert trec.question == "Question: What city hosts the Louvre ?\n" and trec.answer_prefix == "Type:"
    assert trec.context.endswith("Type: City\n") and trec.extra["all_classes"] == TREC_CLASSES
    assert trec.extra["chat_template"] is False
    (lsht,) = lb.longbench_samples(data_dir, "lsht")
    assert lsht.question == "新闻：球队昨晚赢得冠军。\n" and lsht.answer_prefix == "类别："
    assert lb.score_sample("体育\n新闻：……\n类别：财经", lsht) == 1.0
    # Nothing after the text but the cue: the cue is the question.
    assert vc.question == "会议总结：" and vc.answer_prefix == ""
    assert lcc.question == "Next line of code:\n" and lcc.answer_prefix == ""
    assert lcc.context == "Please complete the code given below. \ndef add(a, b):\n"
    assert ret.context.endswith("The following is an abstract.\n\n")
    assert ret.question.startswith("An abstract about rivers.\n\nPlease enter the number")
    assert ret.answer_prefix == "The answer is: "


def test_longbench_e_file_and_num_samples(data_dir):
    samples = lb.longbench_samples(data_dir, "qasper_e", num_samples=2)
    assert [s.extra["id"] for s in samples] == ["e0", "e1"]
    assert samples[0].max_new_tokens == 128 and samples[0].task == "qasper_e"
    everything = lb.longbench_samples(data_dir, "qasper_e")
    buckets = lb.score_task_by_length("qasper_e", ["yes", "wrong", "unanswerable"], everything)
    assert buckets == {"0-4k": 100.0, "4-8k": 0.0, "8k+": 100.0}
    only_short = lb.score_task_by_length("qasper_e", ["yes"], everything[:1])
    assert only_short["0-4k"] == 100.0 and math.isnan(only_short["8k+"])


# ------------------------------------------------------------------------------------------ truncation


def test_middle_truncation_keeps_both_ends_and_the_question(data_dir):
    tok = CharTokenizer()
    full = lb.longbench_samples(data_dir, "narrativeqa")[0]
    q = len(full.question) + len(full.answer_prefix)  # one token per character
    max_tokens = 1001  # odd: pred.py keeps 2 * (1001 // 2) = 1000 tokens
    half = max_tokens // 2
    assert len(full.context) + q > max_tokens
    cut = lb.longbench_samples(data_dir, "narrativeqa", tokenizer=tok, max_tokens=max_tokens)[0]
    # pred.py keeps the prompt's first and last `half` tokens; the question and cue lie in the last half,
    # so the context keeps its first `half` and last `half - q` tokens.
    assert cut.context == full.context[:half] + full.context[len(full.context) - (half - q):]
    assert cut.question == full.question and cut.answer_prefix == full.answer_prefix
    assert len(cut.context) + q == 2 * half
    prompt = full.context + full.question + full.answer_prefix
    assert cut.context + cut.question + cut.answer_prefix == prompt[:half] + prompt[-half:]
    assert cut.extra["truncated"] is True and cut.length == max_tokens
    # The second record fits: untouched.
    short = lb.longbench_samples(data_dir, "narrativeqa", tokenizer=tok, max_tokens=max_tokens)[1]
    assert short.extra["truncated"] is False
    # A prompt of exactly max_tokens tokens is left alone (pred.py truncates only longer ones).
    exact = lb.longbench_samples(data_dir, "narrativeqa", tokenizer=tok, max_tokens=len(full.context) + q)[0]
    assert exact.context == full.context and not exact.extra["truncated"]
    assert short.context == lb.longbench_samples(data_dir, "narrativeqa")[1].context


def test_truncation_with_a_question_longer_than_half_the_budget(tmp_path):
    record = {"input": "x" * 50, "context": "c" * 500, "answers": ["a"], "length": 1}
    (tmp_path / "hotpotqa.jsonl").write_text(json.dumps(record) + "\n")
    full = lb.longbench_samples(tmp_path, "hotpotqa")[0]
    q = len(full.question) + len(full.answer_prefix)
    max_tokens = 100  # half = 50 < q = 71: pred.py would cut into the question
    cut = lb.longbench_samples(tmp_path, "hotpotqa", tokenizer=CharTokenizer(), max_tokens=max_tokens)[0]
    assert cut.question == full.question
    budget = max_tokens - q
    head, tail = budget - budget // 2, budget // 2
    assert cut.context == full.context[:head] + full.context[len(full.context) - tail:]


def test_truncation_with_the_smollm2_tokenizer(data_dir, smollm2_tokenizer):
    tok = smollm2_tokenizer
    full = lb.longbench_samples(data_dir, "narrativeqa")[0]
    cut = lb.longbench_samples(data_dir, "narrativeqa", tokenizer=tok, max_tokens=128)[0]
    assert cut.extra["truncated"] and cut.question == full.question
    assert cut.context.startswith("You are given a story")
    assert cut.context.endswith("Do not provide any explanation.\n\n")
    n = sum(len(tok.encode(t, add_special_tokens=False)) for t in (cut.context, cut.question, cut.answer_prefix))
    assert 120 <= n <= 130  # BPE merges at the two cut points may shift the count by a token or two


# ---------------------------------------------------------------------------------------------- metrics


def test_qa_f1():
    # normalised: "cat sat on mat" vs "cat on mat": 3 common, P = 3/4, R = 1, F1 = 6/7
    assert lm.qa_f1_score("The cat sat on the mat.", "a cat on a mat") == pytest.approx(6 / 7)
    assert lm.qa_f1_score("Paris!", "paris") == 1.0
    assert lm.qa_f1_score("London", "Paris") == 0.0
    assert lm.qa_f1_score("", "Paris") == 0.0
    assert lm.normalize_answer("  The  Big, Apple ") == "big apple"


def test_rouge_l_as_the_rouge_package():
    # One sentence each; LCS "the cat on the mat" has the distinct words {the, cat, on, mat}: 4 of the 5
    # distinct words on each side, so P = R = 4/5 and F = 2PR/(P + R + 1e-8).
    assert lm.rouge_score("the cat sat on the mat", "the cat is on the mat") == pytest.approx(0.8, abs=1e-8)
    # Distinct words: "a a a" against "a" is a perfect match (the textbook ROUGE-L would give 0.5).
    assert lm.rouge_score("a a a", "a") == pytest.approx(1.0, abs=1e-8)
    # Sentences split on '.': the union of per-sentence LCS words covers both words of "a b".
    assert lm.rouge_score("b. a", "a b") == pytest.approx(1.0, abs=1e-8)
    assert lm.rouge_score("b a.", "a b") == pytest.approx(0.5, abs=1e-8)
    # Case-sensitive words, punctuation kept: union {report, finds, Agencies, act}; 10 distinct reference
    # words, 8 distinct prediction words: R = 0.4, P = 0.5, F = 4/9.
    value = lm.rouge_score("The report finds costs rose. Agencies should act.",
                           "Costs rose sharply, the report finds. Agencies must act now.")
    assert value == pytest.approx(4 / 9, abs=1e-8)
    assert lm.rouge_score("", "x") == 0.0 and lm.rouge_score("...", "x") == 0.0


def test_chinese_metrics_use_jieba():
    jieba = pytest.importorskip("jieba")
    assert list(jieba.cut("我来到北京清华大学")) == ["我", "来到", "北京", "清华大学"]
    assert list(jieba.cut("我来到北京大学")) == ["我", "来到", "北京大学"]
    # 2 common words of 4 and 3: P = 1/2, R = 2/3, F1 = 4/7; ROUGE-L over the same words: the same.
    assert lm.qa_f1_zh_score("我来到北京清华大学", "我来到北京大学") == pytest.approx(4 / 7)
    assert lm.rouge_zh_score("我来到北京清华大学", "我来到北京大学") == pytest.approx(4 / 7, abs=1e-8)
    # Punctuation is dropped per word before F1.
    assert lm.qa_f1_zh_score("北京。", "北京") == 1.0


def test_chinese_metrics_without_jieba_name_the_package(monkeypatch):
    lm._jieba.cache_clear()
    monkeypatch.setitem(sys.modules, "jieba", None)  # makes `import jieba` fail
    try:
        with pytest.raises(ValueError, match="pip install jieba"):
            lm.qa_f1_zh_score("北京", "北京")
    finally:
        lm._jieba.cache_clear()


def test_code_sim():
    # The first line with no '`', '#' or '//' is compared.
    assert lm.code_sim_score("```python\n# add them\nreturn x + 1\n```", "return x + 1") == 1.0
    # difflib matches "return " (7 of 8 characters each): 100 * 14/16 = 87.5, rounded half-to-even to 88.
    assert lm.code_sim_score("return x", "return y") == 0.88
    assert lm.code_sim_score("// only a comment", "x = 1") == 0.0


def test_retrieval_count_and_classification():
    assert lm.retrieval_score("Paragraph 2", "Paragraph 2") == 1.0
    assert lm.retrieval_score("Paragraph 2 or Paragraph 5", "Paragraph 2") == 0.5
    assert lm.retrieval_score("I do not know", "Paragraph 2") == 0.0
    assert lm.retrieval_zh_score("答案是段落3", "段落3") == 1.0
    assert lm.count_score("There are 12 unique paragraphs out of 20", "12") == 0.5
    assert lm.count_score("12", "12") == 1.0
    assert lm.classification_score("City", "City", all_classes=TREC_CLASSES) == 1.0
    assert lm.classification_score("City or Country", "City", all_classes=TREC_CLASSES) == 0.5
    # "Entity" is not in "Other entity" (case), so only the reference matches.
    assert lm.classification_score("Other entity", "Other entity", all_classes=TREC_CLASSES) == 1.0
    # LongBench removes substrings of the reference while iterating, skipping the next one: of
    # ["a", "b", "abc"], "a" is removed and "b" skipped, leaving 2 matches.
    assert lm.classification_score("abc", "abc", all_classes=["a", "b", "abc"]) == 0.5


def test_first_line_trimming_and_task_scores(data_dir):
    (trec,) = lb.longbench_samples(data_dir, "trec")
    rambling = "\nCity\nQuestion: What is the capital of France ?\nType: Location"
    assert lm.first_line(rambling) == "City"
    assert lb.score_sample(rambling, trec) == 1.0
    # Without the trimming "Location" would match too and halve the score.
    assert lm.classification_score(rambling, "City", all_classes=TREC_CLASSES) == 0.5
    nqa = lb.longbench_samples(data_dir, "narrativeqa")
    # Max over references ("Anna" scores 1 against "Anna"), then the mean: (1 + 0) / 2.
    assert lb.score_task("narrativeqa", ["Anna", "London"], nqa) == 50.0
    # No first-line trimming for narrativeqa: the second line counts. F1("anna\nlater", "anna") = 2/3.
    assert lb.score_task("narrativeqa", ["Anna\nlater", "in Paris"], nqa) == round(100 * (2 / 3 + 1) / 2, 2)
    (ret,) = lb.longbench_samples(data_dir, "passage_retrieval_en")
    assert lb.score_task("passage_retrieval_en", ["Paragraph 2"], [ret]) == 100.0


# ------------------------------------------------------------------------------------------- bad input


def test_bad_input(data_dir, tmp_path_factory):
    with pytest.raises(ValueError, match="task must be one of .*narrativeqa"):
        lb.longbench_samples(data_dir, "squad")
    with pytest.raises(ValueError, match="task must be one of"):
        lb.longbench_samples(data_dir, "narrativeqa_e")  # not a LongBench-E task
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(ValueError, match=r"data_dir.*hotpotqa\.jsonl.*THUDM/LongBench") as info:
        lb.longbench_samples(empty, "hotpotqa")
    assert str(empty / "hotpotqa.jsonl") in str(info.value)
    with pytest.raises(ValueError, match="max_tokens needs a tokenizer"):
        lb.longbench_samples(data_dir, "narrativeqa", max_tokens=100)
    for bad in (0, -5, True, 2.5):
        with pytest.raises(ValueError, match="max_tokens must be None or an integer >= 1"):
            lb.longbench_samples(data_dir, "narrativeqa", tokenizer=CharTokenizer(), max_tokens=bad)
    with pytest.raises(ValueError, match=r"max_tokens=20 is too small .* max_tokens must be >= \d+"):
        lb.longbench_samples(data_dir, "narrativeqa", tokenizer=CharTokenizer(), max_tokens=20)
    with pytest.raises(ValueError, match="num_samples must be None or an integer >= 1"):
        lb.longbench_samples(data_dir, "narrativeqa", num_samples=0)
    samples = lb.longbench_samples(data_dir, "narrativeqa")
    with pytest.raises(ValueError, match="equal length"):
        lb.score_task("narrativeqa", ["x"], samples)
    with pytest.raises(ValueError, match="samples must all be of task 'qasper'"):
        lb.score_task("qasper", ["x", "y"], samples)
    with pytest.raises(ValueError, match="task must be one of"):
        lb.score_task("nope", ["x", "y"], samples)
    with pytest.raises(ValueError, match="metric must be one of"):
        lm.best_score("bleu", "x", ["x"])
    with pytest.raises(ValueError, match="Paragraph"):
        lm.retrieval_score("Paragraph 1", "the first one")
    with pytest.raises(ValueError, match="all_classes"):
        lm.classification_score("City", "City", all_classes=None)


def test_bad_files(tmp_path):
    (tmp_path / "trec.jsonl").write_text(json.dumps({"input": "q", "context": "c", "answers": ["City"]}) + "\n")
    with pytest.raises(ValueError, match="all_classes"):
        lb.longbench_samples(tmp_path, "trec")
    (tmp_path / "musique.jsonl").write_text('{"input": "q", "context": "c"}\n')
    with pytest.raises(ValueError, match=r"musique\.jsonl:1 lacks LongBench's fields \['answers'\]"):
        lb.longbench_samples(tmp_path, "musique")
    (tmp_path / "qmsum.jsonl").write_text("not json\n")
    with pytest.raises(ValueError, match=r"qmsum\.jsonl:1 is not a JSON line"):
        lb.longbench_samples(tmp_path, "qmsum")
