"""One evaluation item, split the way query-agnostic compression needs it."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class EvalSample:
    """A prompt split into the part that is compressed and the part asked afterwards.

    ``context`` is everything before the question (instructions and the long
    text); it is prefilled and compressed without seeing the question.
    ``question`` (and ``answer_prefix``, appended after the chat template's
    assistant header) are fed afterwards against the compressed cache.
    ``answers`` are the references for ``metric`` (a name understood by the
    task family's scorer); ``extra`` carries what a metric needs beyond them
    (e.g. LongBench's ``all_classes``).
    """

    task: str
    index: int
    context: str
    question: str
    answers: tuple[str, ...]
    metric: str
    answer_prefix: str = ""
    max_new_tokens: int = 32
    length: int = 0  # the target prompt length in tokens (0: not length-controlled)
    extra: dict = field(default_factory=dict, compare=False, hash=False)


def write_samples(samples: list[EvalSample], path) -> None:
    """One JSON object per line, written whole or not at all (a partial file would pin bad samples)."""
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(dataclasses.asdict(s)) + "\n" for s in samples))
    os.replace(tmp, path)


def read_samples(path) -> list[EvalSample]:
    """The samples :func:`write_samples` wrote (answers back as tuples)."""
    samples = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            record["answers"] = tuple(record["answers"])
            samples.append(EvalSample(**record))
    return samples
