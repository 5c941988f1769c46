"""LongBench (THUDM/LongBench, v1 and LongBench-E) from local files, split for query-agnostic compression.

Nothing is downloaded: the user fetches LongBench's ``data.zip`` (the
THUDM/LongBench dataset on the Hugging Face Hub, linked from
github.com/THUDM/LongBench) and points ``data_dir`` at its ``.jsonl`` files.

Prompts and generation lengths are LongBench's ``config/dataset2prompt.json``
and ``config/dataset2maxlen.json`` (the CurDKV paper's appendix prompts are
these), typos included ("asconcisely"), since a changed prompt changes the
scores. Each prompt is cut in three so that ``context + question +
answer_prefix`` is exactly LongBench's prompt:

* ``context``: the instructions and the long text, up to where the
  question-bearing part starts (it is compressed without seeing the question);
* ``question``: from there to the answer cue;
* ``answer_prefix``: the final answer cue ("Answer:", "Summary:", ...), which
  curdkv's runtime puts after the chat template's assistant header, as kvpress does.

The cut points are kvpress's (evaluation/benchmarks/longbench). Per family:

* QA and qmsum (narrativeqa, qasper, multifieldqa_en/zh, hotpotqa, 2wikimqa,
  musique, dureader, qmsum): question = "Question: {input}" ("问题：{input}",
  "Query: {input}"); the instruction repeated after the text ("Now, answer
  ...") stays in the context; cue "Answer:" ("回答：").
* gov_report, multi_news: no question, so question = the trailing
  instruction "Now, write a one-page summary of ..."; cue "Summary:".
* vcsum: neither question nor instruction after the text: question = the
  cue "会议总结：", answer_prefix = "".
* Few-shot trec, triviaqa, samsum, lsht: question = the record's ``input``
  (the new example); the label cue it ends with ("Type:", "Answer:",
  "Summary:", "类别：") becomes the answer_prefix.
* passage_count: question = "Please enter the final count ..."; cue "The
  final answer is: ".
* passage_retrieval_en/zh: question = the abstract and the answer-format
  instruction ("The following is an abstract." stays in the context); cue
  "The answer is: " ("答案是：").
* repobench-p: question = ``input`` (the code just before the line to
  complete); cue "Next line of code:\\n".
* lcc: no input, so question = the cue "Next line of code:\\n",
  answer_prefix = "".

Where kvpress leaves the question empty (vcsum, lcc) the cue moves into the
question instead, because curdkv's runtime needs a non-empty question.

Differences from LongBench's ``pred.py``:

* Middle truncation (``max_tokens``) cuts the *context* only, never the
  question or cue; see :func:`longbench_samples`.
* LongBench applies the chat template to all tasks but trec, triviaqa,
  samsum, lsht, lcc and repobench-p; ``extra["chat_template"]`` records that
  choice, but curdkv's runtime (like kvpress) always applies it.
* LongBench stops samsum at a newline; here every few-shot prediction is cut
  to its first line at scoring (as LongBench's ``eval.py`` also does), which
  gives the same score unless the model's first token is a newline.
* ``max_new_tokens`` is LongBench's; kvpress adds 20.
* LongBench puts the whole prompt, cue included, in the user turn; here
  (as in kvpress) the cue follows the assistant header, and curdkv's
  runtime (:func:`curdkv.context.encode_question`) also puts a newline
  before the question, which neither LongBench nor kvpress has.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .longbench_metrics import FIRST_LINE_TASKS, best_score
from .sample import EvalSample

# LongBench's config/dataset2prompt.json, verbatim.
PROMPTS: dict[str, str] = {
    "narrativeqa": "You are given a story, which can be either a novel or a movie script, and a question. Answer the question asconcisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nStory: {context}\n\nNow, answer the question based on the story asconcisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:",
    "qasper": "You are given a scientific article and a question. Answer the question as concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered based on the information in the article, write \"unanswerable\". If the question is a yes/no question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide any explanation.\n\nArticle: {context}\n\n Answer the question based on the above article as concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered based on the information in the article, write \"unanswerable\". If the question is a yes/no question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:",
    "multifieldqa_en": "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question based on the above text, only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
    "multifieldqa_zh": "阅读以下文字并用中文简短回答：\n\n{context}\n\n现在请基于上面的文章回答下面的问题，只告诉我答案，不要输出任何其他字词。\n\n问题：{input}\n回答：",
    "hotpotqa": "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
    "2wikimqa": "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
    "musique": "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
    "dureader": "请基于给定的文章回答下述问题。\n\n文章：{context}\n\n请基于上述文章回答下面的问题。\n\n问题：{input}\n回答：",
    "gov_report": "You are given a report by a government agency. Write a one-page summary of the report.\n\nReport:\n{context}\n\nNow, write a one-page summary of the report.\n\nSummary:",
    "qmsum": "You are given a meeting transcript and a query containing a question or instruction. Answer the query in one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the above meeting transcript in one or more sentences.\n\nQuery: {input}\nAnswer:",
    "multi_news": "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}\n\nNow, write a one-page summary of all the news.\n\nSummary:",
    "vcsum": "下面有一段会议记录，请你阅读后，写一段总结，总结会议的内容。\n会议记录：\n{context}\n\n会议总结：",
    "trec": "Please determine the type of the question below. Here are some examples of questions.\n\n{context}\n{input}",
    "triviaqa": "Answer the question based on the given passage. Only give me the answer and do not output any other words. The following are some examples.\n\n{context}\n\n{input}",
    "samsum": "Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}\n\n{input}",
    "lsht": "请判断给定新闻的类别，下面是一些例子。\n\n{context}\n{input}",
    "passage_count": "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please carefully read these paragraphs and determine how many unique paragraphs there are after removing duplicates. In other words, how many non-repeating paragraphs are there in total?\n\n{context}\n\nPlease enter the final count of unique paragraphs after removing duplicates. The output format should only contain the number, such as 1, 2, 3, and so on.\n\nThe final answer is: ",
    "passage_retrieval_en": "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph the abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}\n\nPlease enter the number of the paragraph that the abstract is from. The answer format must be like \"Paragraph 1\", \"Paragraph 2\", etc.\n\nThe answer is: ",
    "passage_retrieval_zh": "以下是若干段落文字，以及其中一个段落的摘要。请确定给定的摘要出自哪一段。\n\n{context}\n\n下面是一个摘要\n\n{input}\n\n请输入摘要所属段落的编号。答案格式必须是\"段落1\"，\"段落2\"等格式\n\n答案是：",
    "lcc": "Please complete the code given below. \n{context}Next line of code:\n",
    "repobench-p": "Please complete the code given below. \n{context}{input}Next line of code:\n",
}

# LongBench's config/dataset2maxlen.json.
MAX_NEW_TOKENS: dict[str, int] = {
    "narrativeqa": 128, "qasper": 128, "multifieldqa_en": 64, "multifieldqa_zh": 64, "hotpotqa": 32,
    "2wikimqa": 32, "musique": 32, "dureader": 128, "gov_report": 512, "qmsum": 512, "multi_news": 512,
    "vcsum": 512, "trec": 64, "triviaqa": 32, "samsum": 128, "lsht": 64, "passage_count": 32,
    "passage_retrieval_en": 32, "passage_retrieval_zh": 32, "lcc": 64, "repobench-p": 64,
}

# LongBench eval.py's dataset2metric, by the names of longbench_metrics.METRICS.
TASK_METRICS: dict[str, str] = {
    "narrativeqa": "qa_f1", "qasper": "qa_f1", "multifieldqa_en": "qa_f1", "multifieldqa_zh": "qa_f1_zh",
    "hotpotqa": "qa_f1", "2wikimqa": "qa_f1", "musique": "qa_f1", "dureader": "rouge_zh",
    "gov_report": "rouge", "qmsum": "rouge", "multi_news": "rouge", "vcsum": "rouge_zh",
    "trec": "classification", "triviaqa": "qa_f1", "samsum": "rouge", "lsht": "classification",
    "passage_count": "count", "passage_retrieval_en": "retrieval", "passage_retrieval_zh": "retrieval_zh",
    "lcc": "code_sim", "repobench-p": "code_sim",
}

TASKS: tuple[str, ...] = tuple(PROMPTS)
# LongBench-E: the tasks pred.py runs with --e, read from {task}_e.jsonl.
E_TASKS: tuple[str, ...] = (
    "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "gov_report", "multi_news", "trec", "triviaqa",
    "samsum", "passage_count", "passage_retrieval_en", "lcc", "repobench-p",
)
ALL_TASKS: tuple[str, ...] = TASKS + tuple(f"{t}_e" for t in E_TASKS)

# pred.py builds no chat prompt for these ("chat models are better off without build prompts on these tasks").
NO_CHAT_TASKS = frozenset({"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"})


@dataclass(frozen=True)
class _Split:
    question_start: str  # where the question part begins in the template
    cue: str  # the template's trailing answer cue (answer_prefix); may be ''
    input_cue: str = ""  # few-shot tasks: the label cue that ends the record's ``input``


_SPLITS: dict[str, _Split] = {
    **{t: _Split("Question: {input}", "Answer:") for t in (
        "narrativeqa", "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "musique")},
    "multifieldqa_zh": _Split("问题：{input}", "回答："),
    "dureader": _Split("问题：{input}", "回答："),
    "gov_report": _Split("Now, write a one-page summary of the report.", "Summary:"),
    "qmsum": _Split("Query: {input}", "Answer:"),
    "multi_news": _Split("Now, write a one-page summary of all the news.", "Summary:"),
    "vcsum": _Split("会议总结：", ""),
    "trec": _Split("{input}", "", input_cue="Type:"),
    "triviaqa": _Split("{input}", "", input_cue="Answer:"),
    "samsum": _Split("{input}", "", input_cue="Summary:"),
    "lsht": _Split("{input}", "", input_cue="类别："),
    "passage_count": _Split("Please enter the final count", "The final answer is: "),
    "passage_retrieval_en": _Split("{input}", "The answer is: "),
    "passage_retrieval_zh": _Split("{input}", "答案是："),
    "lcc": _Split("Next line of code:\n", ""),
    "repobench-p": _Split("{input}", "Next line of code:\n"),
}


def split_template(task: str) -> tuple[str, str, str]:
    """LongBench's prompt for ``task`` as (context template, question template, answer cue).

    The three concatenated are LongBench's template; the first holds
    ``{context}``, the second ``{input}`` where the task has one.
    """
    base = _base_task(task)
    template, split = PROMPTS[base], _SPLITS[base]
    start = template.index(split.question_start)
    end = len(template) - len(split.cue)
    assert template.endswith(split.cue) and start < end
    return template[:start], template[start:end], split.cue


def _base_task(task) -> str:
    if task not in ALL_TASKS:
        raise ValueError(f"task must be one of {list(ALL_TASKS)}, got {task!r}")
    return task[:-2] if task.endswith("_e") else task


def _split_prompt(task: str, context: str, input_: str) -> tuple[str, str, str]:
    """``(context, question, answer_prefix)`` whose concatenation is LongBench's prompt for one record."""
    base = _base_task(task)
    context_template, question_template, cue = split_template(base)
    input_cue = _SPLITS[base].input_cue
    if input_cue and input_.rstrip().endswith(input_cue):
        # The few-shot input ends with the label cue (e.g. "...\nType:"): it, and any whitespace after
        # it, becomes the answer prefix, so the question is the new example alone (kvpress does the same).
        at = input_.rstrip().rindex(input_cue)
        input_, cue = input_[:at], input_[at:] + cue
    ctx = context_template.format(context=context)
    question = question_template.format(input=input_)
    if not question.strip():
        # Nothing to ask besides the cue (e.g. an empty input): ask the cue, since a question must not be empty.
        question, cue = question + cue, ""
    return ctx, question, cue


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def _decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True) if ids else ""


def _truncate_context(tokenizer, context: str, question_tokens: int, max_tokens: int, where: str) -> tuple[str, bool]:
    """LongBench's middle truncation, applied so that the question survives whole.

    pred.py keeps the first and the last ``max_tokens // 2`` tokens of the
    whole prompt. When the question and cue fit in that last half this keeps
    the same tokens: the context's first ``half`` and its last ``half - q``
    tokens. When they do not, pred.py would cut the question; here the context
    instead gets the ``2 * half - q`` tokens left, split evenly between its
    head and tail.
    """
    ids = _encode(tokenizer, context)
    if len(ids) + question_tokens <= max_tokens:  # pred.py's test: the prompt is longer than max_tokens
        return context, False
    half = max_tokens // 2
    budget = 2 * half - question_tokens  # pred.py keeps 2 * half tokens, one less than max_tokens when odd
    if budget < 2:
        raise ValueError(
            f"max_tokens={max_tokens} is too small for {where}: its question and answer prefix take "
            f"{question_tokens} tokens, so max_tokens must be >= {question_tokens + 2 + (question_tokens % 2)} "
            f"(an integer) or None for no truncation"
        )
    if question_tokens <= half:
        head, tail = half, half - question_tokens
    else:
        tail = budget // 2
        head = budget - tail
    kept_tail = ids[len(ids) - tail:] if tail else []
    return _decode(tokenizer, ids[:head]) + _decode(tokenizer, kept_tail), True


def _data_file(data_dir, task: str) -> Path:
    path = Path(data_dir) / f"{task}.jsonl"
    if not path.is_file():
        raise ValueError(
            f"data_dir: LongBench file {str(path)!r} not found. curdkv downloads nothing: get LongBench's data "
            "yourself (data.zip of the THUDM/LongBench dataset on the Hugging Face Hub, linked from "
            f"github.com/THUDM/LongBench), unpack it and pass the folder holding {task}.jsonl as data_dir"
        )
    return path


def _read_records(path: Path, limit: int | None) -> list[dict]:
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if limit is not None and len(records) >= limit:
                break
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number} is not a JSON line: {error}") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{number} is not a JSON object")
            missing = [k for k in ("input", "context", "answers") if k not in record]
            if missing:
                raise ValueError(f"{path}:{number} lacks LongBench's fields {missing}")
            answers = record["answers"]
            if isinstance(answers, str):
                answers = [answers]
            if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
                raise ValueError(f"{path}:{number}: answers must be a list of strings, got {answers!r}")
            record["answers"] = answers
            record["_line"] = number
            records.append(record)
    return records


def longbench_samples(
    data_dir,
    task: str,
    tokenizer=None,
    max_tokens: int | None = None,
    num_samples: int | None = None,
) -> list[EvalSample]:
    """The samples of one LongBench task, read from ``{data_dir}/{task}.jsonl``, in file order.

    ``task`` is one of :data:`TASKS` or, for LongBench-E, ``{task}_e`` with
    ``task`` in :data:`E_TASKS` (file ``{task}_e.jsonl``). ``num_samples``
    keeps the first ones.

    With ``max_tokens``, prompts longer than that many tokens of
    ``tokenizer`` (anything with ``encode(text, add_special_tokens=False)``
    and ``decode(ids, skip_special_tokens=True)``) lose the middle of their
    context as in LongBench's ``pred.py`` (see :func:`_truncate_context`).
    Counted are the tokens of context, question and answer prefix, each
    tokenized alone; special and chat-template tokens are not (pred.py
    truncates before its chat template too, counting only the BOS token).

    ``extra`` holds ``all_classes`` (class names, for trec and lsht; else
    None), ``longbench_length`` (LongBench's own length: words, or characters
    for Chinese; it buckets LongBench-E), ``language``, ``id``,
    ``chat_template`` (whether LongBench applies one for this task) and
    ``truncated``. ``length`` is ``max_tokens`` (0 without).
    """
    base = _base_task(task)
    if tokenizer is None and max_tokens is not None:
        raise ValueError("max_tokens needs a tokenizer to count tokens: pass tokenizer, or max_tokens=None")
    for name, value in (("max_tokens", max_tokens), ("num_samples", num_samples)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be None or an integer >= 1, got {value!r}")
    path = _data_file(data_dir, task)
    samples = []
    for index, record in enumerate(_read_records(path, num_samples)):
        where = f"{task} sample {index} ({path.name} line {record['_line']})"
        context, question, answer_prefix = _split_prompt(task, str(record["context"]), str(record["input"] or ""))
        truncated = False
        if max_tokens is not None:
            q = len(_encode(tokenizer, question)) + len(_encode(tokenizer, answer_prefix))
            context, truncated = _truncate_context(tokenizer, context, q, max_tokens, where)
        all_classes = record.get("all_classes")
        if TASK_METRICS[base] == "classification" and not all_classes:
            raise ValueError(f"{where}: a classification task needs all_classes, the list of class names")
        samples.append(
            EvalSample(
                task=task,
                index=index,
                context=context,
                question=question,
                answers=tuple(record["answers"]),
                metric=TASK_METRICS[base],
                answer_prefix=answer_prefix,
                max_new_tokens=MAX_NEW_TOKENS[base],
                length=max_tokens or 0,
                extra={
                    "all_classes": list(all_classes) if all_classes else None,
                    "longbench_length": int(record.get("length") or 0),
                    "language": record.get("language"),
                    "id": record.get("_id"),
                    "chat_template": base not in NO_CHAT_TASKS,
                    "truncated": truncated,
                },
            )
        )
    return samples


def score_sample(prediction: str, sample: EvalSample) -> float:
    """LongBench's score of one prediction, in [0, 1]: the best over the sample's references.

    For trec, triviaqa, samsum and lsht the prediction is first cut to its
    first line, as LongBench's ``eval.py`` does.
    """
    base = _base_task(sample.task)
    return best_score(
        TASK_METRICS[base], prediction, sample.answers,
        all_classes=sample.extra.get("all_classes"), trim_first_line=base in FIRST_LINE_TASKS,
    )


def _checked(task: str, predictions: Sequence[str], samples: Sequence[EvalSample]) -> None:
    _base_task(task)
    if len(predictions) != len(samples) or not samples:
        raise ValueError(
            f"predictions and samples must be non-empty and of equal length, got {len(predictions)} and {len(samples)}"
        )
    other = sorted({s.task for s in samples} - {task})
    if other:
        raise ValueError(f"samples must all be of task {task!r}, got samples of {other}")


def score_task(task: str, predictions: Sequence[str], samples: Sequence[EvalSample]) -> float:
    """LongBench's task score, 0-100 rounded to 2 decimals: the mean of :func:`score_sample`."""
    _checked(task, predictions, samples)
    total = sum(score_sample(p, s) for p, s in zip(predictions, samples))
    return round(100 * total / len(samples), 2)


def score_task_by_length(task: str, predictions: Sequence[str], samples: Sequence[EvalSample]) -> dict[str, float]:
    """LongBench-E's scores per length bucket ("0-4k", "4-8k", "8k+" of ``extra['longbench_length']``).

    0-100 rounded to 2 decimals; a bucket without samples is NaN, as
    LongBench's mean of an empty list.
    """
    _checked(task, predictions, samples)
    buckets: dict[str, list[float]] = {"0-4k": [], "4-8k": [], "8k+": []}
    for prediction, sample in zip(predictions, samples):
        length = sample.extra.get("longbench_length", 0)
        key = "0-4k" if length < 4000 else "4-8k" if length < 8000 else "8k+"
        buckets[key].append(score_sample(prediction, sample))
    return {k: round(100 * sum(v) / len(v), 2) if v else math.nan for k, v in buckets.items()}
