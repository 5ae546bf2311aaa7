"""Automatic prompt optimisation (APO): beam search over a prompt, steered by textual gradients.

Each round, every prompt in the beam runs the agent on the same sample of training tasks. For
each kept prompt, the lowest-reward trajectories are selected with SQL over the catalog
(``sql/prompt_failures.sql``); a critic writes a critique of the prompt given those failures
(the textual gradient) and then edited prompts that apply it. All candidates of a round are
scored on that round's tasks, and the best ``beam_width`` stay. The search's rollouts and the
critic's calls belong to their own run (``<run>.apo``), which is never trained on.

The flow that drives it is ``flows/optimize_prompt.py``; this module holds the parts that do not
need Prefect: task samples, scores, failures and the clean-up of what a critic wrote; the critics are in ``critic``.
"""

from __future__ import annotations

import json
import logging
import random
import re
from typing import Any

from lightning_core.store.catalog import Catalog
from lightning_core.config import ArclightConfig
from lightning_core.rollouts.dataset import load_tasks
from lightning_core.pipeline.steps import sql_text

log = logging.getLogger("arclight.apo")


class ApoError(ValueError):
    """A prompt optimisation setting that cannot work; the message names the key and the fix."""


def run_id(config: ArclightConfig) -> str:
    """Return the run that holds the search's rollouts and critic calls (default ``<run_name>.apo``)."""
    return config.prompt_optimization.run_name or f"{config.run_name}.apo"


def target_prompt(config: ArclightConfig) -> str:
    """Return the name of the prompt to optimise; the error says how to name one."""
    from lightning_core.apo.prompts import configured

    names = sorted(configured(config))
    chosen = config.prompt_optimization.prompt
    if not names:
        raise ApoError("prompt optimisation needs a prompt to edit: name it under rollouts.resources.prompts.<name> in the "
                       "config, and read it in the agent with ctx.prompt('<name>')")
    if chosen is None:
        if len(names) > 1:
            raise ApoError(f"the config names several prompts ({', '.join(names)}): choose one with prompt_optimization.prompt")
        return names[0]
    if chosen not in names:
        raise ApoError(f"prompt_optimization.prompt {chosen!r} is not under rollouts.resources.prompts (it has: {', '.join(names)})")
    return chosen


def target_prompts(config: ArclightConfig) -> list[str]:
    """Return the prompts the search edits: GEPA edits every named prompt unless ``prompt`` names one; beam one."""
    from lightning_core.apo.prompts import configured

    po = config.prompt_optimization
    if po.algorithm == "gepa" and po.prompt is None and configured(config):
        return sorted(configured(config))
    return [target_prompt(config)]


def gepa_budget(config: ArclightConfig) -> int:
    """Return GEPA's budget in task evaluations (``max_metric_calls``, else ``max_rollouts // samples_per_task``)."""
    po = config.prompt_optimization
    if po.max_metric_calls is not None:
        return po.max_metric_calls
    if po.max_rollouts is not None:
        return max(1, po.max_rollouts // po.samples_per_task)
    raise ApoError("prompt_optimization.algorithm is 'gepa', which needs a budget: set prompt_optimization.max_metric_calls "
                   "(task evaluations) or prompt_optimization.max_rollouts")


def draw_tasks(config: ArclightConfig, round: int) -> list[dict[str, Any]]:
    """Return the training tasks every candidate of ``round`` runs (seeded by the round)."""
    if config.rollouts.dataset is None:
        raise ApoError("prompt optimisation scores prompts on training tasks: set rollouts.dataset to a JSONL file")
    tasks = load_tasks(config.rollouts.dataset)
    po = config.prompt_optimization
    rng = random.Random(po.seed * 100_003 + round)
    return rng.sample(tasks, min(po.tasks_per_eval, len(tasks)))


def score(catalog: Catalog, *, run_id: str, epoch: int) -> tuple[float | None, int]:
    """Return the mean reward of one evaluation (failed rollouts count 0) and its rollouts."""
    with catalog.read(spans=False) as con:
        mean, n = con.execute(
            "SELECT avg(coalesce(reward, 0)), count(*) FROM rollouts WHERE run_id = ? AND epoch = ? AND status <> 'planned'",
            [run_id, epoch]).fetchall()[0]
    return mean, n


def evaluated(catalog: Catalog, *, run_id: str, label: str) -> bool:
    """True when the evaluation ``label`` (``<version> r<round>``) of the search has completed."""
    with catalog.read(spans=False) as con:
        return bool(con.execute("SELECT count(*) FROM epochs WHERE run_id = ? AND policy_version = ? AND status = 'completed'",
                                [run_id, label]).fetchall()[0][0])


def started_from(catalog: Catalog, *, run_id: str) -> str | None:
    """Return the version a search began with (its round-0 evaluation), so a resumed search keeps its start."""
    with catalog.read(spans=False) as con:
        rows = con.execute("SELECT policy_version FROM epochs WHERE run_id = ? AND policy_version LIKE '% r0' ORDER BY epoch",
                           [run_id]).fetchall()
    return rows[0][0].rsplit(" ", 1)[0] if rows else None


def rollouts_used(catalog: Catalog, *, run_id: str) -> int:
    """Return the rollouts the search has planned so far (its budget counter)."""
    with catalog.read(spans=False) as con:
        return con.execute("SELECT count(*) FROM rollouts WHERE run_id = ?", [run_id]).fetchall()[0][0]


def failures(catalog: Catalog, *, run_id: str, epoch: int, success: float, limit: int) -> list[dict[str, Any]]:
    """Return the lowest-reward rollouts of an evaluation (one per task) with their last model call."""
    with catalog.read() as con:  # sql/prompt_failures.sql reads the spans view
        rows = con.execute(sql_text("prompt_failures"),
                           {"run_id": run_id, "epoch": epoch, "success": success, "limit": limit}).fetchall()
    out = []
    for rollout_id, task_id, task, reward, status, error, messages, response in rows:
        out.append({"rollout_id": rollout_id, "task_id": task_id, "task": json.loads(task) if task else {},
                    "reward": reward, "status": status, "error": error,
                    "messages": json_list(messages), "response": response})
    return out


def json_list(text: str | None) -> list[dict[str, Any]]:
    try:
        value = json.loads(text) if text else []
    except json.JSONDecodeError:
        return []
    return value if isinstance(value, list) else []


def describe_failures(failures: list[dict[str, Any]], *, skip_system: bool = True, max_chars: int = 400) -> str:
    """Render failed trajectories for a critic: the task, what was said (system prompt left out), reward, error."""
    parts = []
    for i, f in enumerate(failures, start=1):
        task = {k: v for k, v in f["task"].items() if k != "id"}
        lines = [f"Task {i}: {json.dumps(task, ensure_ascii=False)[:max_chars]}"]
        turns = [m for m in f["messages"] if not (skip_system and m.get("role") == "system")]
        for m in turns[-6:]:
            lines.append(f"  {m.get('role', '?')}: {_content(m)[:max_chars]}")
        if f["response"] is not None:
            lines.append(f"  assistant: {f['response'][:max_chars]}")
        lines.append(f"  reward: {f['reward'] if f['reward'] is not None else 'none'} ({f['status']})")
        if f["error"]:
            lines.append(f"  error: {f['error'].splitlines()[0][:max_chars]}")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def _content(message: dict[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, list):  # content parts
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return str(content or "")


_FENCE = re.compile(r"^```[a-zA-Z]*\n?|\n?```$")
_LABEL = re.compile(r"^(new|improved|revised|updated)?\s*prompt\s*:\s*", re.IGNORECASE)


def clean_prompt(text: str | None, *, max_chars: int) -> str:
    """What a critic wrote, as a prompt: fences, a 'New prompt:' label, <<< >>> and wrapping quotes removed; cut to max_chars."""
    text = (text or "").strip()
    text = _FENCE.sub("", text).strip()
    text = _LABEL.sub("", text).strip()
    text = text.removeprefix("<<<").removesuffix(">>>").strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    return text[:max_chars].strip()


def usable(text: str, parent: str) -> str | None:
    """Why a cleaned proposal cannot be a candidate (None when it can)."""
    if not text:
        return "empty"
    if text == parent.strip():
        return "same as its parent"
    if len(text) < 8:
        return f"too short ({len(text)} characters)"
    return None

