"""RULER's 13 tasks: templates, arguments, and one prompt generator per task family.

A generator turns (sample seed, haystack size) into a :class:`Prompt`; the
size (essay words, noise lines, filler needles, list words, coded words,
documents) is what :func:`curdkv.eval.ruler.ruler_samples` searches to fit a
token budget. Every build of a sample starts a fresh ``random.Random`` from
the sample's seed, so the needles, keys and answers of a sample do not
change while its size is searched, and a build is a pure function of
(seed, size).

Templates are RULER's (``data/synthetic/constants.py`` of
``nvidia-long-context-eval==26.3``), each cut in two where the question
begins: ``CONTEXT + QUESTION`` is RULER's template and ``PREFIX`` its answer
prefix; the tests check this against the installed package.
"""

from __future__ import annotations

import math
import random
import string
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from .data import needle_words
from .ruler_data import QASet, common_words, essays, hotpotqa, squad
from .sizing import fit_size


@dataclass(frozen=True)
class Template:
    context: str  # instructions and haystack, up to and including the line break(s) before the question
    question: str
    prefix: str  # RULER's answer prefix (it starts with a space)
    tokens_to_generate: int
    metric: str


# RULER cuts the question where kvpress's RULER split does: at the last line
# of the template for most families, at the repeated instruction for QA.
TEMPLATES = {
    "niah": Template(
        "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
        "I will quiz you about the {type_needle_v} afterwards.\n{context}\n",
        "What are all the special magic {type_needle_v} for {query} mentioned in the provided text?",
        " The special magic {type_needle_v} for {query} mentioned in the provided text are",
        128, "string_match_all",
    ),
    "variable_tracking": Template(
        "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n",
        "Question: Find all variables that are assigned the value {query} in the text above.",
        # "assgined" is in RULER 26.3's template (upstream RULER has since fixed it): kept, the prompt is the benchmark.
        " Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are "
        "assgined the value {query}, they are: ",
        30, "string_match_all",
    ),
    "common_words_extraction": Template(
        "Below is a numbered list of words. In these words, some appear more often than others. "
        "Memorize the ones that appear most often.\n{context}\n",
        "Question: What are the 10 most common words in the above list?",
        " Answer: The top 10 words that appear most often in the list are:",
        120, "string_match_all",
    ),
    "freq_words_extraction": Template(
        "Read the following coded text and track the frequency of each coded word. "
        "Find the three most frequently appeared coded words. {context}\n",
        "Question: Do not provide any explanation. Please ignore the dots '....'. "
        "What are the three most frequently appeared words in the above coded text?",
        " Answer: According to the coded text above, the three most frequently appeared words are:",
        50, "string_match_all",
    ),
    "qa": Template(
        "Answer the question based on the given documents. Only give me the answer and do not output any "
        "other words.\n\nThe following are given documents.\n\n{context}\n\n",
        "Answer the question based on the given documents. Only give me the answer and do not output any "
        "other words.\n\nQuestion: {query}",
        " Answer:",
        32, "string_match_part",
    ),
}

# synthetic.yaml of RULER 26.3: task -> (family, args).
TASK_ARGS: dict[str, tuple[str, dict]] = {
    "niah_single_1": ("niah", dict(type_haystack="repeat", type_needle_k="words", type_needle_v="numbers",
                                   num_needle_k=1, num_needle_v=1, num_needle_q=1)),
    "niah_single_2": ("niah", dict(type_haystack="essay", type_needle_k="words", type_needle_v="numbers",
                                   num_needle_k=1, num_needle_v=1, num_needle_q=1)),
    "niah_single_3": ("niah", dict(type_haystack="essay", type_needle_k="words", type_needle_v="uuids",
                                   num_needle_k=1, num_needle_v=1, num_needle_q=1)),
    "niah_multikey_1": ("niah", dict(type_haystack="essay", type_needle_k="words", type_needle_v="numbers",
                                     num_needle_k=4, num_needle_v=1, num_needle_q=1)),
    "niah_multikey_2": ("niah", dict(type_haystack="needle", type_needle_k="words", type_needle_v="numbers",
                                     num_needle_k=1, num_needle_v=1, num_needle_q=1)),
    "niah_multikey_3": ("niah", dict(type_haystack="needle", type_needle_k="uuids", type_needle_v="uuids",
                                     num_needle_k=1, num_needle_v=1, num_needle_q=1)),
    "niah_multivalue": ("niah", dict(type_haystack="essay", type_needle_k="words", type_needle_v="numbers",
                                     num_needle_k=1, num_needle_v=4, num_needle_q=1)),
    "niah_multiquery": ("niah", dict(type_haystack="essay", type_needle_k="words", type_needle_v="numbers",
                                     num_needle_k=1, num_needle_v=1, num_needle_q=4)),
    "vt": ("variable_tracking", dict(num_chains=1, num_hops=4)),
    "cwe": ("common_words_extraction", dict(freq_cw=30, freq_ucw=3, num_cw=10)),
    "fwe": ("freq_words_extraction", dict(alpha=2.0)),
    "qa_1": ("qa", dict(dataset="squad")),
    "qa_2": ("qa", dict(dataset="hotpotqa")),
}


@dataclass(frozen=True)
class Prompt:
    context: str
    question: str
    answer_prefix: str
    answers: tuple[str, ...]
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Plan:
    """One sample before its size is known: ``build(size)`` for sizes in [min_size, max_size]."""

    build: Callable[[int], Prompt]
    min_size: int
    max_size: int


Counter = Callable[[str], int]  # raw token count of a text (no special tokens, no chat template)


class Family:
    """A task family's generator, set up once per ``ruler_samples`` call."""

    unit_tokens: float = 1.0  # rough tokens per unit of size, for the first size tried
    skips_unfit: bool = False  # QA: a question whose own documents do not fit is skipped, not an error

    def plan(self, slot: int, sample_seed: int) -> Plan:
        raise NotImplementedError


# ---------------------------------------------------------------- needle in a haystack

NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
DEPTHS = [round(100 * i / 39) for i in range(40)]  # np.round(np.linspace(0, 100, 40)), RULER's needle depths in %


def _random_item(r: random.Random, kind: str) -> str:
    if kind == "numbers":
        return str(r.randint(10**6, 10**7 - 1))  # 7 digits
    if kind == "words":
        return r.choice(needle_words())
    if kind == "uuids":
        return str(uuid.UUID(int=r.getrandbits(128), version=4))
    raise ValueError(f"needle type must be numbers, words or uuids, got {kind!r}")


def _join_keys(keys: list[str]) -> str:
    return keys[0] if len(keys) == 1 else ", ".join(keys[:-1]) + ", and " + keys[-1]


def _singular(text: str) -> str:
    # RULER words a one-answer question in the singular by these replacements on the template.
    for old, new in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
        text = text.replace(old, new)
    return text


class Niah(Family):
    def __init__(self, args: dict, seed: int, length: int, count: Counter):
        self.a = dict(args)
        self.a["num_needle_k"] = max(self.a["num_needle_k"], self.a["num_needle_q"])
        self.seed = seed
        self.haystack = self.a["type_haystack"]
        self.num_needles = self.a["num_needle_k"] * self.a["num_needle_v"]
        self.unit_tokens = {"essay": 1.3, "repeat": 22.0, "needle": 45.0 if "uuids" in
                            (self.a["type_needle_k"], self.a["type_needle_v"]) else 25.0}[self.haystack]
        t = TEMPLATES["niah"]
        self.parts = (t.context, t.question, t.prefix)
        self.type_v = self.a["type_needle_v"]
        if self.a["num_needle_q"] * self.a["num_needle_v"] == 1:
            self.parts = tuple(_singular(p) for p in self.parts)
            self.type_v = self.type_v[:-1]

    def plan(self, slot: int, sample_seed: int) -> Plan:
        # Essay: words (at least one); noise/needle haystacks: lines, at least one per needle.
        low = 1 if self.haystack == "essay" else self.num_needles
        return Plan(lambda size: self._build(sample_seed, size), low, 10**9)

    def _build(self, sample_seed: int, size: int) -> Prompt:
        a, r = self.a, random.Random(sample_seed)
        keys, values, needles = [], [], []
        for _ in range(a["num_needle_k"]):
            keys.append(_random_item(r, a["type_needle_k"]))
            values.append([_random_item(r, a["type_needle_v"]) for _ in range(a["num_needle_v"])])
            needles += [NEEDLE.format(type_needle_v=a["type_needle_v"], key=keys[-1], value=v) for v in values[-1]]
        random.Random(self.seed).shuffle(needles)  # RULER shuffles with a fresh generator of the run's seed

        if self.haystack == "essay":
            sents = essays().prefix_sentences(size)
            depths = sorted(r.sample(DEPTHS, len(needles)))
            cuts = [0] + [int(len(sents) * d / 100) for d in depths] + [len(sents)]
            pieces = []
            for i in range(1, len(cuts)):
                pieces.append(" ".join(sents[cuts[i - 1]:cuts[i]]))  # may be '' (then RULER has a double space)
                if i - 1 < len(needles):
                    pieces.append(needles[i - 1])
            haystack = " ".join(pieces)
        else:
            if self.haystack == "repeat":
                lines = [NOISE] * size
            else:  # "needle": the haystack is made of other needles with random keys and values
                lines = [NEEDLE.format(type_needle_v=a["type_needle_v"], key=_random_item(r, a["type_needle_k"]),
                                       value=_random_item(r, a["type_needle_v"])) for _ in range(size)]
            where = sorted(r.sample(range(size), len(needles)), reverse=True)
            for at, needle in zip(where, needles):
                lines.insert(at, needle)
            depths = sorted(round(100 * at / size) for at in where)
            haystack = "\n".join(lines)

        chosen = r.sample(range(a["num_needle_k"]), a["num_needle_q"])
        query = _join_keys([keys[i] for i in chosen])
        answers = tuple(v for i in chosen for v in values[i])
        ctx, q, prefix = self.parts
        return Prompt(
            context=ctx.format(type_needle_v=self.type_v, context=haystack),
            question=q.format(type_needle_v=self.type_v, query=query),
            answer_prefix=prefix.format(type_needle_v=self.type_v, query=query),
            answers=answers,
            extra={"depths": depths},
        )


# ---------------------------------------------------------------- variable tracking

class VariableTracking(Family):
    """Chains ``VAR B = VAR A`` hidden in noise lines, after one solved example (RULER's few-shot ICL)."""

    unit_tokens = 22.0
    noise = NOISE + "\n"

    def __init__(self, args: dict, seed: int, length: int, count: Counter):

        self.num_chains, self.num_hops = args["num_chains"], args["num_hops"]
        t = TEMPLATES["variable_tracking"]
        # RULER builds the example once per run: 3-letter names, at most 10 hops, noise lines in steps
        # of 5, the most that fit 500 tokens with the tokens to generate, counted without chat template.
        icl_seed = random.Random(seed).getrandbits(64)

        def icl(steps: int) -> tuple[str, list[str]]:
            text, names, _ = self._chain_text(random.Random(icl_seed), 5 * steps, letters=3,
                                              hops=min(10, self.num_hops))
            return text, names

        def icl_tokens(steps: int) -> int:
            return count(icl(steps)[0]) + t.tokens_to_generate

        steps, _ = fit_size(icl_tokens, 500, 1, 100, 4)
        text, names = icl(steps or 1)
        self.icl = text + " " + " ".join(names) + "\n\n"
        self.icl_names = names

    def _chain_text(self, r: random.Random, noises: int, letters: int, hops: int):
        names = []
        while len(names) < (hops + 1) * self.num_chains:  # distinct names (RULER redraws duplicates)
            name = "".join(r.choices(string.ascii_uppercase, k=letters))
            if name not in names:
                names.append(name)
        chains = []
        for c in range(self.num_chains):
            own = names[c * (hops + 1):(c + 1) * (hops + 1)]
            chain = [f"VAR {own[0]} = {r.randint(10000, 99998)}"]  # np.random.randint(10000, 99999)
            chain += [f"VAR {own[j + 1]} = VAR {own[j]} " for j in range(hops)]
            chains.append(chain)
        lines = [self.noise] * noises
        for chain in chains:
            where = sorted(r.sample(range(len(lines)), len(chain)))
            for j, at in enumerate(where):
                lines.insert(at + j, chain[j])
        haystack = " ".join(lines).replace(". \n", ".\n")
        value = chains[0][0].split("=")[-1].strip()
        t = TEMPLATES["variable_tracking"]
        text = (t.context.format(context=haystack) + t.question.format(query=value)
                + t.prefix.format(num_v=hops + 1, query=value))
        return text, names[:hops + 1], (haystack, value)

    def plan(self, slot: int, sample_seed: int) -> Plan:
        # More noise lines than chain links: RULER's fallback for fewer (splitting the noise) is not kept.
        return Plan(lambda size: self._build(sample_seed, size), self.num_hops + 2, 10**9)

    def _build(self, sample_seed: int, size: int) -> Prompt:
        r = random.Random(sample_seed)
        _, names, (haystack, value) = self._chain_text(r, size, letters=5, hops=self.num_hops)
        icl = self.icl
        for name in self.icl_names:  # RULER renames the example's variables for every sample
            icl = icl.replace(name, "".join(r.choices(string.ascii_uppercase, k=len(name))))
        t = TEMPLATES["variable_tracking"]
        return Prompt(
            # RULER 26.3 puts the example before the task as ' ' + example + '\n\n'.
            context=" " + icl + "\n\n" + t.context.format(context=haystack),
            question=t.question.format(query=value),
            answer_prefix=t.prefix.format(num_v=self.num_hops + 1, query=value),
            answers=tuple(names),
        )


# ---------------------------------------------------------------- common words extraction

class CommonWords(Family):
    """A numbered word list where ``num_cw`` words repeat ``freq_cw`` times and the rest ``freq_ucw`` times."""

    def __init__(self, args: dict, seed: int, length: int, count: Counter):
        self.seed = seed
        self.words = list(common_words())
        random.Random(seed).shuffle(self.words)
        self.num_cw = args["num_cw"]
        # RULER: below 4096 tokens a lighter list (6/1 repeats) and example (20 words, 3/1 repeats).
        if length < 4096:
            self.example, self.repeats = (20, 3, 1), (6, 1)
        else:
            self.example, self.repeats = (40, 10, 3), (args["freq_cw"], args["freq_ucw"])
        self.unit_tokens = 5.0 * self.repeats[1]

    def _example(self, r: random.Random, num_words: int, common: int, uncommon: int):
        chosen = r.sample(self.words, num_words)
        top = chosen[:self.num_cw]
        listed = top * common + chosen[self.num_cw:] * uncommon
        random.Random(self.seed).shuffle(listed)
        return " ".join(f"{i + 1}. {w}" for i, w in enumerate(listed)), top

    def plan(self, slot: int, sample_seed: int) -> Plan:
        return Plan(lambda size: self._build(sample_seed, size), self.num_cw + 1, len(self.words))

    def _build(self, sample_seed: int, size: int) -> Prompt:
        r = random.Random(sample_seed)
        t = TEMPLATES["common_words_extraction"]
        ex_list, ex_top = self._example(r, *self.example)
        word_list, top = self._example(r, size, *self.repeats)
        # RULER 26.3 appends the example's answer right after the prefix's colon (no space).
        example = (t.context.format(context=ex_list) + t.question + t.prefix
                   + " ".join(f"{i + 1}. {w}" for i, w in enumerate(ex_top)))
        return Prompt(
            context=example + "\n" + t.context.format(context=word_list),
            question=t.question,
            answer_prefix=t.prefix,
            answers=tuple(top),
        )


# ---------------------------------------------------------------- frequent words extraction

def zeta(s: float) -> float:
    """Riemann zeta for s > 1 (scipy.special.zeta's value, without scipy): Euler-Maclaurin at N = 10."""
    if s == 2.0:
        return math.pi**2 / 6
    n = 10
    total = sum(k ** -s for k in range(1, n)) + n ** (1 - s) / (s - 1) + n ** -s / 2
    # Bernoulli terms B2k / (2k)! * s(s+1)...(s+2k-2) * N^(-s-2k+1)
    bernoulli = (1 / 6, -1 / 30, 1 / 42, -1 / 30, 5 / 66, -691 / 2730, 7 / 6)
    rising = s
    for k, b in enumerate(bernoulli, start=1):
        total += b / math.factorial(2 * k) * rising * n ** (-s - 2 * k + 1)
        rising *= (s + 2 * k - 1) * (s + 2 * k)
    return total


class FrequentWords(Family):
    """Coded 6-letter words drawn with Zipf (zeta) frequencies; the top one is '...', noise."""

    unit_tokens = 2.5
    word_length = 6

    def __init__(self, args: dict, seed: int, length: int, count: Counter):
        self.seed, self.alpha = seed, args["alpha"]
        self.vocab_size = length // 50  # RULER's default vocabulary size
        self.z = zeta(self.alpha)

    def _counts(self, size: int) -> list[int]:
        return [int(size * (k ** -self.alpha) / self.z) for k in range(1, self.vocab_size + 1)]

    def plan(self, slot: int, sample_seed: int) -> Plan:
        if self.vocab_size < 5:  # too short a length for 3 answers and a 5th-ranked word: nothing fits
            return Plan(lambda size: self._build(sample_seed, size), 1, 0)
        # The fewest words where the 3 answers appear and each beats the 5th-ranked word.
        low = 1
        while not (self._counts(low)[3] >= 1 and self._counts(low)[3] > self._counts(low)[4]):
            low += 1
        return Plan(lambda size: self._build(sample_seed, size), low, 10**9)

    def _build(self, sample_seed: int, size: int) -> Prompt:
        r = random.Random(sample_seed)
        vocab: set[str] = set()
        while len(vocab) < self.vocab_size:
            vocab.add("".join(r.choices(string.ascii_lowercase, k=self.word_length)))
        ordered = sorted(vocab)
        random.Random(self.seed).shuffle(ordered)
        ordered[0] = "..."  # the most frequent "word" is noise the question says to ignore
        text = [w for w, n in zip(ordered, self._counts(size)) for _ in range(n)]
        random.Random(self.seed).shuffle(text)
        t = TEMPLATES["freq_words_extraction"]
        return Prompt(
            context=t.context.format(context=" ".join(text)),
            question=t.question,
            answer_prefix=t.prefix,
            answers=tuple(ordered[1:4]),
        )


# ---------------------------------------------------------------- question answering

DOCUMENT = "Document {i}:\n{document}"


class QuestionAnswering(Family):
    """A question with its paragraphs among distractor paragraphs; questions in dataset order, as RULER."""

    skips_unfit = True

    def __init__(self, args: dict, seed: int, length: int, count: Counter):
        self.seed = seed
        self.data: QASet = {"squad": squad, "hotpotqa": hotpotqa}[args["dataset"]]()
        self.unit_tokens = {"squad": 170.0, "hotpotqa": 130.0}[args["dataset"]]
        self.num_questions = len(self.data.questions)

    def plan(self, slot: int, sample_seed: int) -> Plan:
        q = self.data.questions[slot % self.num_questions]
        return Plan(lambda size: self._build(slot, sample_seed, size), len(q.gold), len(self.data.docs))

    def _pick(self, q, r: random.Random, num_docs: int) -> list[int]:
        n_docs = len(self.data.docs)
        if num_docs >= n_docs:
            return list(range(n_docs))
        own, more = list(q.docs), list(q.more)
        if num_docs - len(own) > len(more):  # own, same-article, then random paragraphs
            banned = set(own) | set(more)
            need = num_docs - len(own) - len(more)
            # a uniform sample of the rest without listing it: sample more, drop the banned
            extra = [i for i in r.sample(range(n_docs), need + len(banned)) if i not in banned][:need]
            return own + more + extra
        if num_docs >= len(own):
            return own + r.sample(more, num_docs - len(own))
        # Fewer documents than the question's own (HotpotQA's 10 at short lengths, where RULER
        # cannot generate): its supporting paragraphs and its shortest distractors, so that
        # the prompt can come close to the length even when one paragraph is long.
        gold = list(q.gold)
        rest = sorted((i for i in own if i not in set(gold)), key=lambda i: (len(self.data.docs[i]), i))
        return gold + rest[:num_docs - len(gold)]

    def _build(self, slot: int, sample_seed: int, size: int) -> Prompt:
        q = self.data.questions[slot % self.num_questions]
        docs = self._pick(q, random.Random(sample_seed), size)
        random.Random(self.seed).shuffle(docs)
        t = TEMPLATES["qa"]
        body = "\n\n".join(DOCUMENT.format(i=i + 1, document=self.data.docs[d]) for i, d in enumerate(docs))
        return Prompt(
            context=t.context.format(context=body),
            question=t.question.format(query=q.query),
            answer_prefix=t.prefix,
            answers=q.answers,
            extra={"question_index": slot % self.num_questions,
                   "gold_documents": tuple(self.data.docs[d] for d in q.gold)},
        )


FAMILIES: dict[str, type[Family]] = {
    "niah": Niah,
    "variable_tracking": VariableTracking,
    "common_words_extraction": CommonWords,
    "freq_words_extraction": FrequentWords,
    "qa": QuestionAnswering,
}
