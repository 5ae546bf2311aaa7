"""The agent: Arclight calls ``run(task, ctx)`` once per rollout and trains on the model calls it makes.

``task`` is one line of tasks.jsonl. ``ctx`` holds the rollout's model URL (``ctx.base_url``: every call through it is
recorded with its token ids), the model name to ask for (``ctx.model``), the sampling temperature and
``ctx.resources`` (config.yaml's ``rollouts.resources``). The value ``run`` returns is the rollout's reward.
"""

import re

from openai import OpenAI


def run(task: dict, ctx) -> float:
    """Answer one task through the rollout's model URL; return 1.0 for the right answer, else 0.0."""
    client = OpenAI(base_url=ctx.base_url, api_key=ctx.api_key)

    # The model call: any number of them, with your prompt and tools. Keep ctx.base_url and ctx.model.
    reply = client.chat.completions.create(
        model=ctx.model,
        temperature=ctx.temperature,
        max_tokens=int(ctx.resources.get("max_tokens", 16)),
        messages=[{"role": "system", "content": "Answer with the number only."},
                  {"role": "user", "content": task["question"]}],
    )
    text = reply.choices[0].message.content or ""

    # The reward: how good this rollout was, for this task. Here: the first number in the answer is the right one.
    numbers = re.findall(r"-?\d+", text)
    return 1.0 if numbers[:1] == [task["answer"]] else 0.0
