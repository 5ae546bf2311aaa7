"""Automatic prompt optimisation (APO): beam search over a prompt, steered by textual gradients.

Each round, every prompt in the beam runs the agent on the same sample of training tasks. For
each kept prompt, the lowest-reward trajectories are selected with SQL over the catalog
(``sql/prompt_failures.sql``); a critic writes a critique of the prompt given those failures
(the textual gradient) and then edited prompts that apply it. All candidates of a round are
scored on that round's tasks, and the best ``beam_width`` stay. The search's rollouts and the
critic's calls belong to their own run (``<run>.apo``), which is never trained on.

The flow that drives it is ``flows/optimize_prompt.py``; this module holds the parts that do not
need Prefect: task samples, scores, failures, critics and the clean-up of what a critic wrote.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from lightning_core import semconv
from lightning_core.catalog import Catalog
from lightning_core.config import ArclightConfig
from lightning_core.epoch import load_tasks
from lightning_core.pipeline import sql_text

log = logging.getLogger("arclight.apo")


class ApoError(ValueError):
    """A prompt optimisation setting that cannot work; the message names the key and the fix."""


@dataclass(frozen=True)
class Proposal:
    """One edit a critic proposes: the critique it applies and the new prompt."""

    critique: str
    text: str


class Critic(Protocol):
    """Writes ``n`` proposals for a prompt, given its failed trajectories."""

    made_by: str

    def propose(self, prompt: str, failures: list[dict[str, Any]], n: int, *, where: "CallSite") -> list[Proposal]:
        ...


@dataclass(frozen=True)
class CallSite:
    """Where a critic's calls are traced: the optimisation run, the evaluation epoch they critique, the parent."""

    run_id: str
    epoch: int
    parent_version: str
    round: int


def run_id(config: ArclightConfig) -> str:
    """Return the run that holds the search's rollouts and critic calls (default ``<run_name>.apo``)."""
    return config.prompt_optimization.run_name or f"{config.run_name}.apo"


def target_prompt(config: ArclightConfig) -> str:
    """Return the name of the prompt to optimise; the error says how to name one."""
    from lightning_core.prompts import configured

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
                    "messages": _json_list(messages), "response": response})
    return out


def _json_list(text: str | None) -> list[dict[str, Any]]:
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


CRITIQUE_SYSTEM = "You are an expert at writing instructions (system prompts) for AI assistants."
CRITIQUE = """An assistant ran with the prompt below and failed the tasks that follow.

PROMPT:
<<<
{prompt}
>>>

FAILED TASKS:
{failures}

In at most three sentences, say what the prompt should tell the assistant so that it gets such tasks right."""
EDIT = """Rewrite the prompt below so that it follows the advice. Keep what works. Reply with the new prompt only.

PROMPT:
<<<
{prompt}
>>>

ADVICE:
{critique}

NEW PROMPT:"""


class ModelCritic:
    """A chat model writes the critique, then the edited prompt (two calls per proposal), each traced.

    By default the local vLLM answers through the gateway, under a rollout id of the optimisation
    run, so the gateway records the calls with their token ids; with ``critic.url`` a hosted
    OpenAI-compatible API answers and the calls are recorded as spans from here.
    """

    made_by = "critic"

    def __init__(self, config: ArclightConfig, *, gateway_client=None, collector_url: str, collector_token: str | None):
        import openai

        c = config.prompt_optimization.critic
        self.config = config
        self.temperature, self.max_tokens = c.temperature, c.max_tokens
        self.gateway = gateway_client
        self.collector_url, self.collector_token = collector_url, collector_token
        self.calls = 0
        if c.url:
            key = os.environ.get(c.api_key_env)
            if not key:
                raise ApoError(f"prompt_optimization.critic.url is set but ${c.api_key_env} is empty: export the API key "
                               "there (or name another variable in critic.api_key_env)")
            if not c.model:
                raise ApoError("prompt_optimization.critic.url is set: name the model too (critic.model)")
            self.model, self.hosted = c.model, True
            self.client = openai.OpenAI(base_url=c.url, api_key=key, timeout=c.timeout_s, max_retries=2)
        else:
            if gateway_client is None:
                raise ApoError("the local critic answers through the gateway: open the stack with its model")
            self.model, self.hosted = c.model or config.model.served_name, False
            self.api_key = config.gateway.token or os.environ.get("ARCLIGHT_GATEWAY_TOKEN") or "arclight"
            self.timeout_s = c.timeout_s

    def propose(self, prompt: str, failures: list[dict[str, Any]], n: int, *, where: CallSite) -> list[Proposal]:
        shown = describe_failures(failures)
        out = []
        for k in range(n):
            critique = self._chat([{"role": "system", "content": CRITIQUE_SYSTEM},
                                   {"role": "user", "content": CRITIQUE.format(prompt=prompt, failures=shown)}],
                                  role="critique", where=where, k=k)
            text = self._chat([{"role": "system", "content": CRITIQUE_SYSTEM},
                               {"role": "user", "content": EDIT.format(prompt=prompt, critique=critique.strip())}],
                              role="edit", where=where, k=k)
            out.append(Proposal(critique=critique.strip(), text=text))
        return out

    def _chat(self, messages: list[dict[str, str]], *, role: str, where: CallSite, k: int) -> str:
        import openai

        from lightning_core import tracing

        self.calls += 1
        rollout_id = f"{where.run_id}-critic-r{where.round}-{where.parent_version}-{k}-{role}"
        context = tracing.RolloutContext(where.run_id, where.epoch, rollout_id, f"critic-{where.parent_version}", 0)
        handle = tracing.init_tracing(service_name="arclight-apo", endpoint=self.collector_url, token=self.collector_token,
                                      context=context, set_global=False, batch=False)
        attributes = {semconv.APO_ROLE: role, semconv.APO_PARENT_VERSION: where.parent_version}
        if self.hosted:  # no gateway records this call: the span itself is the model call
            attributes.update({semconv.GEN_AI_OPERATION_NAME: "chat", semconv.GEN_AI_REQUEST_MODEL: self.model,
                               semconv.REQUEST_MESSAGES: json.dumps(messages, ensure_ascii=False)})
        try:
            with handle.tracer.start_as_current_span(f"apo {role}", attributes=attributes) as span:
                if self.hosted:
                    client = self.client
                else:
                    base_url = self.gateway.register_rollout(rollout_id=rollout_id, run_id=where.run_id, epoch=where.epoch,
                                                             task_id=f"critic-{where.parent_version}", attempt=0)
                    client = openai.OpenAI(base_url=base_url, api_key=self.api_key, timeout=self.timeout_s, max_retries=2)
                try:
                    reply = client.chat.completions.create(model=self.model, messages=messages,
                                                           temperature=self.temperature, max_tokens=self.max_tokens)
                finally:
                    if not self.hosted:
                        self.gateway.forget_rollout(rollout_id)
                text = reply.choices[0].message.content or ""
                if self.hosted:
                    span.set_attribute(semconv.RESPONSE_TEXT, text)
                return text
        finally:
            handle.shutdown()


class ScriptedCritic:
    """A Python function writes the proposals: ``fn(prompt, failures, n) -> [(critique, new prompt), ...]``.

    For rule-based edits, and to measure the search itself where no model writes useful edits.
    """

    made_by = "scripted"

    def __init__(self, config: ArclightConfig):
        from lightning_core.runner import load_agent

        ref = config.prompt_optimization.critic.function
        if not ref:
            raise ApoError("prompt_optimization.critic.kind is 'scripted': name the function as critic.function: 'module:function'")
        paths = tuple(str(p) for p in [*config.rollouts.agent_path, config.project_dir])
        self.fn: Callable[..., Any] = load_agent(ref, paths=paths)
        self.ref = ref

    def propose(self, prompt: str, failures: list[dict[str, Any]], n: int, *, where: CallSite) -> list[Proposal]:
        result = self.fn(prompt, failures, n)
        out = []
        for item in list(result or [])[:n]:
            if isinstance(item, Proposal):
                out.append(item)
            elif isinstance(item, dict):
                out.append(Proposal(str(item.get("critique", "")), str(item.get("text", item.get("prompt", "")))))
            else:
                critique, text = item
                out.append(Proposal(str(critique), str(text)))
        return out


def make_critic(config: ArclightConfig, *, gateway_client, collector_url: str, collector_token: str | None) -> Critic:
    """Return the critic the config names."""
    if config.prompt_optimization.critic.kind == "scripted":
        return ScriptedCritic(config)
    return ModelCritic(config, gateway_client=gateway_client, collector_url=collector_url, collector_token=collector_token)
