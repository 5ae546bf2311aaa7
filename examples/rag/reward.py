"""The retrieval example's reward: a format score plus token F1 against the gold answer (as in the multi-hop QA
setup this example follows), weighted ``FORMAT_WEIGHT`` and ``1 - FORMAT_WEIGHT``.

- format: 1 when the agent ended with the ``answer`` tool and a short answer (1 to ``MAX_ANSWER_WORDS`` words),
  else 0;
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


def format_ok(prediction: str | None) -> bool:
    return prediction is not None and 1 <= len(re.findall(r"\S+", prediction)) <= MAX_ANSWER_WORDS


def reward(prediction: str | None, gold: str) -> float:
    return FORMAT_WEIGHT * format_ok(prediction) + (1 - FORMAT_WEIGHT) * f1(prediction, gold)
