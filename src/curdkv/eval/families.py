"""The benchmarks the runner knows, as :class:`~curdkv.eval.run.TaskFamily` objects."""

from __future__ import annotations

import sys
from typing import Sequence

from .run import TaskFamily
from .sample import EvalSample

# The English tasks of LongBench v1 by the categories of its paper (and of the CurDKV paper's tables).
LONGBENCH_CATEGORIES = {
    "single-doc QA": ("narrativeqa", "qasper", "multifieldqa_en"),
    "multi-doc QA": ("hotpotqa", "2wikimqa", "musique"),
    "summarization": ("gov_report", "qmsum", "multi_news"),
    "few-shot": ("trec", "triviaqa", "samsum"),
    "synthetic": ("passage_count", "passage_retrieval_en"),
    "code": ("lcc", "repobench-p"),
}
LONGBENCH_ENGLISH = tuple(t for tasks in LONGBENCH_CATEGORIES.values() for t in tasks)


def ruler_family(tasks: Sequence[str] | None = None, lengths: Sequence[int] = (4096,), num_samples: int = 50,
                 seed: int = 0) -> TaskFamily:
    """RULER's tasks at each length; lengths beyond the model's context are skipped with a message."""
    from .ruler import RULER_AVERAGES, RULER_TASKS, ruler_samples, score_sample

    tasks = tuple(tasks or RULER_TASKS)
    unknown = [t for t in tasks if t not in RULER_TASKS]
    if unknown:
        raise ValueError(f"tasks must be among {list(RULER_TASKS)}, got {unknown}")
    for length in lengths:
        if isinstance(length, bool) or not isinstance(length, int) or length < 256:
            raise ValueError(f"lengths must be integers >= 256, got {length!r}")

    def samples(tokenizer, max_length: int | None) -> list[EvalSample]:
        usable = [n for n in lengths if max_length is None or n <= max_length]
        skipped = [n for n in lengths if n not in usable]
        if skipped:
            print(f"ruler: skipping lengths {skipped}, beyond the model's context of {max_length} tokens", file=sys.stderr)
        if not usable:
            raise ValueError(f"lengths {list(lengths)} all exceed the model's context of {max_length} tokens")
        return [s for n in usable for t in tasks for s in ruler_samples(t, tokenizer, n, num_samples, seed)]

    params = {"tasks": list(tasks), "lengths": list(lengths), "num_samples": num_samples, "seed": seed}
    return TaskFamily("ruler", samples, score_sample, dict(RULER_AVERAGES), params)


def longbench_family(data_dir, tasks: Sequence[str] | None = None, max_tokens: int | None = None,
                     num_samples: int | None = None) -> TaskFamily:
    """LongBench's tasks read from ``data_dir``, middle-truncated to ``max_tokens`` (default: the model's context)."""
    from .longbench import ALL_TASKS, longbench_samples
    from .longbench import score_sample as longbench_score

    tasks = tuple(tasks or LONGBENCH_ENGLISH)
    unknown = [t for t in tasks if t not in ALL_TASKS]
    if unknown:
        raise ValueError(f"tasks must be among {list(ALL_TASKS)}, got {unknown}")

    def samples(tokenizer, max_length: int | None) -> list[EvalSample]:
        budget = max_tokens or max_length
        if max_length is not None and budget > max_length:
            raise ValueError(f"max_tokens must be at most the model's context of {max_length} tokens, got {budget}")
        return [s for t in tasks for s in longbench_samples(data_dir, t, tokenizer, budget, num_samples)]

    def scorer(sample: EvalSample, prediction: str) -> float:
        return 100.0 * longbench_score(prediction, sample)

    averages = {"average": list(tasks)}
    averages.update({name: list(members) for name, members in LONGBENCH_CATEGORIES.items()
                     if any(t in tasks for t in members)})
    params = {"data_dir": str(data_dir), "tasks": list(tasks), "max_tokens": max_tokens, "num_samples": num_samples}
    return TaskFamily("longbench", samples, scorer, averages, params)
