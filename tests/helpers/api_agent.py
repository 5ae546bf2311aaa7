"""An agent for tests/test_python_api.py: a solver answers, a critic judges, and the critic's score is the reward.

Only the solver trains (``agent_match="^solver$"``); the critic's calls are recorded and stay frozen. The tiny
random model's verdict means nothing, so the critic's rule scores the answer's length, plus a little per sample of
the group, so that every group's rewards differ and each epoch trains a version.
"""

from __future__ import annotations

from lightning_core import tracing


def solve(task, ctx):
    client = ctx.openai_client()
    with tracing.agent("solver"):
        reply = client.chat.completions.create(
            model=ctx.model, messages=[{"role": "user", "content": task["question"]}], max_tokens=6,
            temperature=ctx.temperature)
        answer = reply.choices[0].message.content or ""
    with tracing.agent("critic"):
        client.chat.completions.create(
            model=ctx.model, messages=[{"role": "user", "content": f"Is {answer!r} right? Say yes or no."}],
            max_tokens=2, temperature=0.0)
        return (len(answer) % 5) / 10 + 0.01 * ctx.sample_index
