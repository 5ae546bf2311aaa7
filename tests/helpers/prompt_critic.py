"""A scripted critic for prompt-optimisation tests: reads the failures it is shown, names a missing word."""

from __future__ import annotations

from collections import Counter

SEEN: list[dict] = []  # what the critic was shown (in the flow's process), for the test to check


def critic(prompt, failures, n):
    SEEN.extend(failures)
    missing = Counter(word for f in failures for word in f["task"]["needs"] if word not in prompt)
    return [(f"{count} failed tasks needed {word!r}", f"{prompt} Mention {word}.") for word, count in missing.most_common(n)]
