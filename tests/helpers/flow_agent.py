"""An agent for flow tests: asks the served model a question through the gateway.

``task["behavior"]`` picks what it does: ``answer`` (default) calls the model and is rewarded
when the reply contains the task's target letter, ``raise`` fails, ``hang`` never returns and
``silent`` returns without a span.
"""

from __future__ import annotations

import time

from lightning_core import tracing


def run(task, ctx):
    behavior = task.get("behavior", "answer")
    if behavior == "silent":
        return None
    with tracing.agent("responder"):
        if behavior == "raise":
            raise ValueError(f"task {ctx.task_id} asked this agent to fail")
        if behavior == "hang":
            time.sleep(3600)
        client = ctx.openai_client()
        reply = client.chat.completions.create(
            model=ctx.model, messages=[{"role": "user", "content": task["question"]}],
            max_tokens=6, temperature=ctx.temperature,
        )
        text = reply.choices[0].message.content or ""
    # partial credit by length so that a random tiny model still gives groups unequal rewards
    return 1.0 if task["target"] in text else (len(text) % 5) / 10
