"""LongBench's scoring functions, re-implemented to give LongBench's numbers.

Each function scores one prediction against one reference and returns a value
in [0, 1]; :func:`best_score` takes the maximum over a sample's references, as
LongBench's ``eval.py`` does. The behaviour follows THUDM/LongBench
``LongBench/metrics.py`` as run with its ``requirements.txt`` (``rouge``,
``jieba``, ``fuzzywuzzy`` without ``python-Levenshtein``), quirks included,
because published LongBench tables (and kvpress's, which the CurDKV paper
uses) were computed that way. Where this code differs, the function says so.

Dependencies: ``jieba`` (PyPI, pure Python) for the Chinese metrics only, the
tokenizer LongBench uses; nothing else outside the standard library:

* ROUGE-L is computed here rather than with a package. LongBench calls the
  unmaintained ``rouge`` package, whose ROUGE-L is not the textbook one (it
  counts *distinct* words, see :func:`rouge_score`); ``rouge-score`` would
  lowercase, drop punctuation and drop every non-ASCII character (all of
  Chinese) and so give other numbers.
* ``fuzz.ratio`` of ``fuzzywuzzy`` without ``python-Levenshtein`` is
  ``difflib.SequenceMatcher``'s ratio rounded to an integer percentage; the
  standard library reproduces it exactly. ``rapidfuzz``'s ratio (an indel
  distance, what fuzzywuzzy gives *with* python-Levenshtein) differs by about
  2 points on a quarter of random code-line pairs, so it is not used.
"""

from __future__ import annotations

import difflib
import functools
import re
import string
from collections import Counter
from typing import Callable, Iterable, Sequence

# LongBench's Chinese punctuation set, plus ASCII punctuation, removed by normalize_zh_answer.
_ZH_PUNCTUATION = frozenset(
    string.punctuation
    + "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏."
)
_EN_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")

# Tasks whose prediction is cut to its first non-empty line before scoring (LongBench eval.py):
# few-shot prompts, where a model tends to go on with the next made-up example.
FIRST_LINE_TASKS = frozenset({"trec", "triviaqa", "samsum", "lsht"})


@functools.cache
def _jieba():
    try:
        import jieba
    except ImportError:
        raise ValueError(
            "LongBench's Chinese metrics (qa_f1_zh, rouge_zh) tokenize with jieba, which is not installed: "
            "run `pip install jieba==0.42.1`"
        ) from None
    import logging

    jieba.setLogLevel(logging.WARNING)  # jieba logs its dictionary loading at DEBUG to stderr
    return jieba


def _cut(text: str) -> list[str]:
    """jieba's default (accurate mode) segmentation, as LongBench calls it."""
    return list(_jieba().cut(text, cut_all=False))


def normalize_answer(text: str) -> str:
    """SQuAD-style normalisation: lowercase, drop punctuation and English articles, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _EN_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def normalize_zh_answer(text: str) -> str:
    """Lowercase, drop Chinese and ASCII punctuation, and remove all whitespace."""
    return "".join("".join(ch for ch in text.lower() if ch not in _ZH_PUNCTUATION).split())


def _token_f1(prediction: Sequence[str], reference: Sequence[str]) -> float:
    common = sum((Counter(prediction) & Counter(reference)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(prediction), common / len(reference)
    return 2 * precision * recall / (precision + recall)


def qa_f1_score(prediction: str, ground_truth: str, **_) -> float:
    """Bag-of-words F1 between the normalised prediction and reference (English QA tasks)."""
    return _token_f1(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


def qa_f1_zh_score(prediction: str, ground_truth: str, **_) -> float:
    """F1 over jieba words, each normalised with :func:`normalize_zh_answer`, empties dropped."""

    def words(text: str) -> list[str]:
        return [w for w in (normalize_zh_answer(t) for t in _cut(text)) if w]

    return _token_f1(words(prediction), words(ground_truth))


def _sentences(text: str) -> list[list[str]]:
    # The ``rouge`` package's preprocessing: split on '.', drop empty pieces, collapse whitespace, split
    # on ' '. A piece of only spaces survives as one sentence holding the empty word '' (kept, as there).
    return [" ".join(piece.split()).split(" ") for piece in text.split(".") if len(piece) > 0]


def _lcs_words(ref: list[str], hyp: list[str]) -> set[str]:
    """Words of one longest common subsequence, chosen with the ``rouge`` package's tie-breaking.

    Which LCS is reconstructed matters because only the set of its words is
    used. The package backtracks recursively (and scores 0 once Python's
    recursion limit is hit, about 1000 words per sentence pair); this walks
    the same path iteratively, so such long pairs get their true score.
    """
    n, m = len(ref), len(hyp)
    table = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        row, prev, word = table[i], table[i - 1], ref[i - 1]
        for j in range(1, m + 1):
            row[j] = prev[j - 1] + 1 if word == hyp[j - 1] else max(prev[j], row[j - 1])
    words, i, j = set(), n, m
    while i > 0 and j > 0:
        if ref[i - 1] == hyp[j - 1]:
            words.add(ref[i - 1])
            i, j = i - 1, j - 1
        elif table[i - 1][j] > table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return words


def rouge_score(prediction: str, ground_truth: str, **_) -> float:
    """ROUGE-L F as LongBench computes it with the ``rouge`` package (1.0.1), ``rouge-l`` ``f``.

    That is the summary-level union-LCS ROUGE-L with two quirks kept here:
    texts are split into sentences on '.', and counts are of *distinct*
    words: recall = |U| / |distinct reference words|, precision = |U| /
    |distinct prediction words|, where U is the set of words of an LCS of
    every (reference sentence, prediction sentence) pair; F = 2PR/(P+R+1e-8).
    Case and punctuation other than '.' are kept. An empty prediction or
    reference scores 0, as LongBench's ``except: return 0.0`` makes it.
    """
    hyp, ref = _sentences(prediction), _sentences(ground_truth)
    if not hyp or not ref:
        return 0.0
    union: set[str] = set()
    for ref_sentence in ref:
        for hyp_sentence in hyp:
            union |= _lcs_words(ref_sentence, hyp_sentence)
    recall = len(union) / len({w for s in ref for w in s})
    precision = len(union) / len({w for s in hyp for w in s})
    return 2.0 * (precision * recall / (precision + recall + 1e-8))


def rouge_zh_score(prediction: str, ground_truth: str, **_) -> float:
    """:func:`rouge_score` over jieba words joined with spaces (Chinese summarisation and DuReader)."""
    return rouge_score(" ".join(_cut(prediction)), " ".join(_cut(ground_truth)))


def classification_score(prediction: str, ground_truth: str, all_classes: Sequence[str] | None = None, **_) -> float:
    """1/k if the reference is among the k class names found in the prediction, else 0 (TREC, LSHT).

    Class names that are substrings of the reference (but not it) are dropped
    from the matches first. LongBench removes them from the list while
    iterating over it, which skips the element after each removal; the loop
    below keeps that behaviour so scores match.
    """
    if not all_classes:
        raise ValueError("classification_score needs all_classes, the task's class names (a non-empty list)")
    matched = [name for name in all_classes if name in prediction]
    i = 0
    while i < len(matched):
        term = matched[i]
        if term in ground_truth and term != ground_truth:
            matched.remove(term)
        i += 1
    return 1.0 / len(matched) if ground_truth in matched else 0.0


def _id_share(prediction: str, wanted: str) -> float:
    """Share of the numbers in ``prediction`` that equal ``wanted`` (0 with no number)."""
    numbers = re.findall(r"\d+", prediction)
    return sum(number == wanted for number in numbers) / len(numbers) if numbers else 0.0


def _reference_id(ground_truth: str, pattern: str) -> str:
    found = re.findall(pattern, ground_truth)
    if not found:
        raise ValueError(f"a retrieval reference must contain {pattern!r}, got {ground_truth!r}")
    return found[0]


def retrieval_score(prediction: str, ground_truth: str, **_) -> float:
    """Share of numbers in the prediction equal to N of the reference 'Paragraph N'."""
    return _id_share(prediction, _reference_id(ground_truth, r"Paragraph (\d+)"))


def retrieval_zh_score(prediction: str, ground_truth: str, **_) -> float:
    """Share of numbers in the prediction equal to N of the reference '段落N'."""
    return _id_share(prediction, _reference_id(ground_truth, r"段落(\d+)"))


def count_score(prediction: str, ground_truth: str, **_) -> float:
    """Share of numbers in the prediction equal to the reference count (PassageCount)."""
    return _id_share(prediction, str(ground_truth))


def _fuzz_ratio(a: str, b: str) -> int:
    # fuzzywuzzy's fuzz.ratio without python-Levenshtein: equal -> 100, one empty -> 0, else difflib's
    # ratio as a rounded percentage (Python's round, as fuzzywuzzy's utils.intr).
    if a == b:
        return 100
    if not a or not b:
        return 0
    return int(round(100 * difflib.SequenceMatcher(None, a, b).ratio()))


def code_sim_score(prediction: str, ground_truth: str, **_) -> float:
    """Edit similarity of the first code line of the prediction and the reference line (LCC, RepoBench-P).

    The first line (after leading newlines) without '`', '#' or '//' is
    taken, skipping Markdown fences and comments; none gives ''.
    """
    line = next(
        (x for x in prediction.lstrip("\n").split("\n") if "`" not in x and "#" not in x and "//" not in x), ""
    )
    return _fuzz_ratio(line, ground_truth) / 100


METRICS: dict[str, Callable[..., float]] = {
    "qa_f1": qa_f1_score,
    "qa_f1_zh": qa_f1_zh_score,
    "rouge": rouge_score,
    "rouge_zh": rouge_zh_score,
    "classification": classification_score,
    "retrieval": retrieval_score,
    "retrieval_zh": retrieval_zh_score,
    "count": count_score,
    "code_sim": code_sim_score,
}


def first_line(prediction: str) -> str:
    """The prediction up to its first newline, after leading newlines (LongBench's few-shot trimming)."""
    return prediction.lstrip("\n").split("\n")[0]


def best_score(
    metric: str,
    prediction: str,
    answers: Iterable[str],
    all_classes: Sequence[str] | None = None,
    trim_first_line: bool = False,
) -> float:
    """Max of ``metric`` over the references, in [0, 1]; 0 with no reference (as LongBench)."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {sorted(METRICS)}, got {metric!r}")
    if not isinstance(prediction, str):
        raise ValueError(f"prediction must be a string, got {type(prediction).__name__}")
    if trim_first_line:
        prediction = first_line(prediction)
    fn = METRICS[metric]
    score = 0.0
    for reference in answers:
        score = max(score, fn(prediction, reference, all_classes=all_classes))
    return float(score)
