"""Automatic prompt optimisation (APO): what GEPA's search needs from Arclight, apart from its adapter.

GEPA (the gepa library, driven through ``gepa_adapter``) searches over the project's prompt resources; this
module holds the parts that do not need Prefect: the prompts it edits, its budget and validation tasks, the
score of one evaluation, and the clean-up of what a critic wrote. The search's rollouts and the critic's calls
belong to their own run (``<run>.apo``), which is never trained on. The flow that drives it is
``flows/optimize_prompt.py``; the critics are in ``critic``. (Our own beam search was replaced by GEPA, issue 73.)
"""

from __future__ import annotations

import json
import logging
import random
import re
from typing import Any

from lightning_core.store.catalog import Catalog
from lightning_core.config import DEFAULT_MAX_ROLLOUTS, ArclightConfig
from lightning_core.rollouts.dataset import load_tasks

log = logging.getLogger("arclight.apo")


class ApoError(ValueError):
    """A prompt optimisation setting that cannot work; the message names the key and the fix."""


def run_id(config: ArclightConfig) -> str:
    """Return the run that holds the search's rollouts and critic calls (default ``<run_name>.apo``)."""
    return config.prompt_optimization.run_name or f"{config.run_name}.apo"


def target_prompts(config: ArclightConfig) -> list[str]:
    """Return the prompts the search edits: every named prompt (one GEPA component each) unless ``prompt`` names one."""
    from lightning_core.apo.prompts import configured

    names = sorted(configured(config))
    chosen = config.prompt_optimization.prompt
    if not names:
        raise ApoError("prompt optimisation needs a prompt to edit: name it under rollouts.resources.prompts.<name> in the "
                       "config, and read it in the agent with ctx.prompt('<name>')")
    if chosen is None:
        return names
    if chosen not in names:
        raise ApoError(f"prompt_optimization.prompt {chosen!r} is not under rollouts.resources.prompts (it has: {', '.join(names)})")
    return [chosen]


def gepa_budget(config: ArclightConfig) -> int:
    """Return GEPA's budget in task evaluations: ``max_metric_calls``, else ``max_rollouts // samples_per_task``, else
    the default budget of rollouts (``DEFAULT_MAX_ROLLOUTS``, about what the beam search's defaults spent)."""
    po = config.prompt_optimization
    if po.max_metric_calls is not None:
        return po.max_metric_calls
    return max(1, (po.max_rollouts or DEFAULT_MAX_ROLLOUTS) // po.samples_per_task)


def draw_tasks(config: ArclightConfig, round: int) -> list[dict[str, Any]]:
    """Return ``tasks_per_eval`` training tasks, seeded by ``seed`` and ``round`` (GEPA's validation split is round 0's:
    the beam search's first sample, so a seed draws the tasks it drew)."""
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


def rollouts_used(catalog: Catalog, *, run_id: str) -> int:
    """Return the rollouts the search has planned so far (its budget counter)."""
    with catalog.read(spans=False) as con:
        return con.execute("SELECT count(*) FROM rollouts WHERE run_id = ?", [run_id]).fetchall()[0][0]


def json_list(text: str | None) -> list[dict[str, Any]]:
    """A JSON list stored as text (a call's messages), or [] when it is none."""
    try:
        value = json.loads(text) if text else []
    except json.JSONDecodeError:
        return []
    return value if isinstance(value, list) else []


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

