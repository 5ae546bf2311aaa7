"""Small agents for runner tests: each behaves one way (returns, raises, hangs, stays silent)."""

from __future__ import annotations

import asyncio
import time

from lightning_core import tracing


def returns_reward(task, ctx):
    with tracing.agent("solver"):
        with tracing.tool("calc"):
            value = task["a"] * task["b"]
    return 1.0 if value == task["answer"] else 0.0


async def async_emits_rewards(task, ctx):
    with tracing.agent("async-solver"):
        await asyncio.sleep(0.01)
        tracing.emit_reward(0.25, name="progress")
        tracing.emit_reward(0.75)
    return None


def raises(task, ctx):
    with tracing.agent("crasher"):
        raise RuntimeError(f"agent broke on {ctx.task_id}")


def hangs(task, ctx):
    """Start a child that sleeps and sleep too; with ``task["pids"]``, write both pids there first (one a line)."""
    import os
    import subprocess
    from pathlib import Path

    with tracing.agent("sleeper"):
        child = subprocess.Popen(["sleep", "3600"])
        if task.get("pids"):
            Path(task["pids"]).write_text(f"{os.getpid()}\n{child.pid}\n")
        time.sleep(3600)


def silent(task, ctx):
    return None


def reports_context(task, ctx):
    tracing.emit_message(f"{ctx.base_url}|{ctx.model}|{ctx.attempt}|{ctx.resources.get('prompt')}")
    return 0.5
