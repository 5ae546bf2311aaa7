"""The retrieval example's reward: a format score plus token F1 against the gold answer (as in the multi-hop QA
setup this example follows), weighted ``FORMAT_WEIGHT`` and ``1 - FORMAT_WEIGHT``.

- format: 1 when the agent ended with the ``answer`` tool and its answer has the shape of an answer here: a name
  of 1 to ``MAX_ANSWER_WORDS`` words that appears in a document the agent retrieved in this run; else 0. (The
  first version asked only for 1-5 words: the policy learned in three epochs to answer at once, without a search,
  with the worked example's answer, for a steady 0.2; see README.md.)
- F1: SQuAD-style token F1 between the normalised answer and gold (lower case, punctuation and articles removed);
  exact match is reported beside it.
"""

from __future__ import annotations

import re
import string
from collections import Counter

FORMAT_WEIGHT = 0.2
MAX_ANSWER_WORDS = 5


def normalize(text: str) -> list[str]:
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    return [w for w in text.split() if w not in {"a", "an", "the"}]


def f1(prediction: str | None, gold: str) -> float:
    if not prediction:
        return 0.0
    pred, ref = normalize(prediction), normalize(gold)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str | None, gold: str) -> bool:
    return prediction is not None and normalize(prediction) == normalize(gold)


def format_ok(prediction: str | None, retrieved: list[str]) -> bool:
    """An answer of 1-5 words found (case-insensitively) in one of the ``retrieved`` document texts."""
    if prediction is None or not 1 <= len(re.findall(r"\S+", prediction)) <= MAX_ANSWER_WORDS:
        return False
    needle = prediction.strip().lower()
    return any(needle in text.lower() for text in retrieved)


def reward(prediction: str | None, gold: str, retrieved: list[str]) -> float:
    return FORMAT_WEIGHT * format_ok(prediction, retrieved) + (1 - FORMAT_WEIGHT) * f1(prediction, gold)
