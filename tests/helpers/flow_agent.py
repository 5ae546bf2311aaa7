"""An agent for flow tests: asks the served model a question through the gateway.

``task["behavior"]`` picks what it does: ``answer`` (default) calls the model and is rewarded
when the reply contains the task's target letter, ``constant`` calls the model and always gets
0.5 (a group with no learning signal), ``raise`` fails, ``hang`` never returns (with ``task["pid_dir"]``, it starts a
child and writes both pids there first), ``silent`` returns without a span and ``flaky`` fails its first attempt and
answers on the next. The agent span says where the rollout ran, read while it runs:
``test.runner_pid`` is the process that ran it (the parent of its fork server), ``test.runner`` that process's title
(a Ray worker's reads ``ray::...``) and ``test.runner_parent_pid`` the process that started it (a Ray worker's is its
node's raylet).
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import psutil
from opentelemetry import trace

from lightning_core import tracing


def run(task, ctx):
    behavior = task.get("behavior", "answer")
    if behavior == "silent":
        return None
    with tracing.agent("responder"):
        runner = psutil.Process(psutil.Process(os.getppid()).ppid())
        trace.get_current_span().set_attributes({
            "test.runner_pid": runner.pid, "test.runner": " ".join(runner.cmdline())[:200],
            "test.runner_parent_pid": runner.ppid()})
        if behavior == "raise" or (behavior == "flaky" and ctx.attempt == 0):
            raise ValueError(f"task {ctx.task_id} asked this agent to fail (attempt {ctx.attempt})")
        if behavior == "hang":
            if task.get("pid_dir"):  # a child too, and both pids in <pid_dir>/<rollout>-<attempt>: are they killed?
                child = subprocess.Popen(["sleep", "3600"])
                Path(task["pid_dir"], f"{ctx.rollout_id}-{ctx.attempt}").write_text(f"{os.getpid()} {child.pid}")
            time.sleep(3600)
        client = ctx.openai_client()
        reply = client.chat.completions.create(
            model=ctx.model, messages=[{"role": "user", "content": task["question"]}],
            max_tokens=6, temperature=ctx.temperature,
        )
        text = reply.choices[0].message.content or ""
    if behavior == "constant":
        return 0.5
    # Partial credit by length, plus a little per sample of the group (rollout ids end in the sample
    # index): a random tiny model's replies can score alike, and a group with equal rewards trains
    # nothing, so every group gets unequal rewards and each epoch trains a new version.
    sample_index = int(ctx.rollout_id.rsplit("-", 1)[1])
    return (1.0 if task["target"] in text else (len(text) % 5) / 10) + 0.01 * sample_index


def run_without_agent_span(task, ctx):
    """Plain client code, as an agent in another language or a script: model calls and a reward, no agent span."""
    reply = ctx.openai_client().chat.completions.create(
        model=ctx.model, messages=[{"role": "user", "content": task["question"]}], max_tokens=6, temperature=ctx.temperature)
    sample_index = int(ctx.rollout_id.rsplit("-", 1)[1])
    return (len(reply.choices[0].message.content or "") % 5) / 10 + 0.01 * sample_index


def run_unless_marked(task, ctx):
    """``run``, but the agent's own tool fails while the file ``task["fail_while"]`` exists (a backend that is down)."""
    if os.path.exists(task["fail_while"]):
        raise RuntimeError("calculator backend unreachable")
    return run(task, ctx)


def run_steady(task, ctx):
    """Several model calls half a second apart (rollouts in flight long enough to lose a server under them). An agent
    that carries on: a call that fails is caught and the rollout scored 0, as if the answer were wrong."""
    import openai

    client = ctx.openai_client(max_retries=0)
    turns, score = int(task.get("turns", 4)), 0.0
    with tracing.agent("responder"):
        for _ in range(turns):
            try:
                reply = client.chat.completions.create(
                    model=ctx.model, messages=[{"role": "user", "content": task["question"]}], max_tokens=4,
                    temperature=ctx.temperature)
            except openai.APIError:
                return 0.0
            score += (len(reply.choices[0].message.content or "") % 5) / 10
            time.sleep(float(task.get("pause_s", 0.5)))
    return score / turns + 0.01 * int(ctx.rollout_id.rsplit("-", 1)[1])
