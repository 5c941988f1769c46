"""Needle-in-a-haystack prompts in RULER's niah_single_2 format (essay haystack, word key, 7-digit value)."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from .data import needle_words, paul_graham_essays

PREAMBLE = (
    "Some special magic numbers are hidden within the following text. "
    "Make sure to memorize it. I will quiz you about the numbers afterwards.\n"
)
NEEDLE = "One of the special magic numbers for {key} is: {value}."
QUESTION = "What are all the special magic numbers for {key} mentioned in the provided text?"
ANSWER_PREFIX = " The special magic numbers for {key} mentioned in the provided text are"


@dataclass(frozen=True)
class NeedleSample:
    context: str  # preamble + haystack with the needle; no question in it
    question: str
    answer_prefix: str
    answer: str
    depth: float  # where the needle sits, as a fraction of the haystack


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", re.sub(r"\s+", " ", text)) if s]


def needle_samples(tokenizer, num_samples: int, context_tokens: int = 4096, seed: int = 0) -> list[NeedleSample]:
    """``num_samples`` prompts of about ``context_tokens`` tokens, needles at evenly spread depths."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if context_tokens < 128:
        raise ValueError(f"context_tokens must be >= 128, got {context_tokens}")
    rng = random.Random(seed)
    sentences = _sentences(paul_graham_essays())
    words = needle_words()
    samples = []
    for i in range(num_samples):
        key, value = rng.choice(words), str(rng.randint(10**6, 10**7 - 1))
        needle = NEEDLE.format(key=key, value=value)
        start = rng.randrange(0, len(sentences) // 2)
        budget = context_tokens - len(tokenizer(PREAMBLE + needle).input_ids) - 8
        hay, used = [], 0
        for s in sentences[start:]:
            n = len(tokenizer(" " + s, add_special_tokens=False).input_ids)
            if used + n > budget:
                break
            hay.append(s)
            used += n
        depth = (i + 0.5) / num_samples
        at = int(round(depth * len(hay)))
        text = " ".join(hay[:at] + [needle] + hay[at:])
        samples.append(
            NeedleSample(
                context=PREAMBLE + text,
                question=QUESTION.format(key=key),
                answer_prefix=ANSWER_PREFIX.format(key=key),
                answer=value,
                depth=depth,
            )
        )
    return samples


def answered(sample: NeedleSample, prediction: str) -> bool:
    """RULER's string_match_all for one needle: the value appears in the prediction."""
    return sample.answer.lower() in prediction.lower()
