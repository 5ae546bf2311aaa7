"""An agent for prompt-optimisation tests: its reward depends on its prompt, which it reads as a resource.

It asks the served model the task's question under the prompt ``instructions`` (so the rollout has
a real, traced model call), and is rewarded by the share of the task's ``needs`` words that the
prompt mentions. A prompt that names more of them scores higher, whatever the tiny model says.
"""

from __future__ import annotations

from lightning_core import tracing


def run(task, ctx):
    instructions = ctx.prompt("instructions", default="Answer.")
    with tracing.agent("prompted"):
        client = ctx.openai_client()
        client.chat.completions.create(
            model=ctx.model, messages=[{"role": "system", "content": instructions}, {"role": "user", "content": task["question"]}],
            max_tokens=4, temperature=ctx.temperature,
        )
    needs = task["needs"]
    return sum(1 for word in needs if word in instructions) / len(needs)
