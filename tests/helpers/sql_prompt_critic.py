"""A scripted critic for prompt optimisation on the sql example: records which trajectories it was shown for which
prompt, adds one instruction to the writer's prompt, and gives the rewriter's back unchanged (which the search drops)."""

from __future__ import annotations

SEEN: list[tuple[str, list[dict]]] = []  # (prompt, failures shown), in the flow's process, for the test to check
ADDED = "\nEnd the query with a semicolon."


def critic(prompt, failures, n):
    SEEN.append((prompt, list(failures)))
    if prompt.startswith("You write SQLite queries."):
        return [(f"{len(failures)} queries did not return the gold result", prompt + ADDED)][:n]
    return [("nothing to change", prompt)][:n]
