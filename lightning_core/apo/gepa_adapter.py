"""GEPA, the library, as prompt optimisation's search (the only one: it replaced our beam search, issue 73).

GEPA (reflective prompt evolution with a Pareto front of candidates) does the searching; this module is its
adapter to Arclight and writes no search of its own:

- ``evaluate``: each named prompt's text becomes a version in the catalog (a child of the candidate GEPA
  reflected on last), and the caller's function runs the tasks as rollouts of the search's run
  (gateway, collector, lake), returning a score per task;
- ``make_reflective_dataset``: what the reflection model reads comes from the lake by SQL
  (``sql/prompt_reflections.sql``): the task, each model call's messages and answer, the agent that made
  it, the failed tools, the reward;
- the reflection model is the configured critic (``propose_new_texts``): a chat model asked GEPA's own
  reflection prompt (rendered and read back by GEPA's ``InstructionProposalSignature``, each call traced
  under the search's run), or a scripted critic, which gets the failed trajectories of the minibatch
  (``fn(prompt, failures, n)``). A proposal that is empty, unchanged or too short is dropped and counted.

The flow that drives it is ``flows/optimize_prompt.py``; nothing here needs Prefect.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable

from gepa import EvaluationBatch

from lightning_core.apo import prompts
from lightning_core.apo.critic import CallSite, Critic, ModelCritic
from lightning_core.apo.prompts import PromptVersion
from lightning_core.apo.search import clean_prompt, json_list, usable
from lightning_core.pipeline.steps import sql_text
from lightning_core.store.catalog import Catalog

log = logging.getLogger("arclight.apo")

# (chosen versions per prompt name, tasks) -> (the evaluation's epoch, task id -> mean reward)
EvaluateFn = Callable[[dict[str, PromptVersion], list[dict[str, Any]]], tuple[int, dict[str, float]]]


def split_tasks(config) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Return GEPA's (training, validation) tasks: validation is ``tasks_per_eval`` tasks drawn by ``seed``
    (``search.draw_tasks``), training the other tasks of rollouts.dataset (the validation tasks when no other is left)."""
    from lightning_core.apo.search import draw_tasks
    from lightning_core.rollouts.dataset import load_tasks

    val = draw_tasks(config, 0)
    held = {t["id"] for t in val}
    train = [t for t in load_tasks(config.rollouts.dataset) if t["id"] not in held]
    return (train or list(val)), val


def label(chosen: dict[str, PromptVersion], tasks: list[dict[str, Any]]) -> str:
    """Name one GEPA evaluation (an epoch of the search's run): the versions, then a digest of the task ids."""
    import hashlib

    digest = hashlib.sha1(json.dumps(sorted(t["id"] for t in tasks)).encode()).hexdigest()[:10]
    return f"{'+'.join(v.version for v in chosen.values())} g{digest}"


def task_scores(catalog: Catalog, *, run_id: str, epoch: int) -> dict[str, float]:
    """Return each task's mean reward in one evaluation (a failed rollout counts 0)."""
    with catalog.read(spans=False) as con:
        rows = con.execute("SELECT task_id, avg(coalesce(reward, 0)) FROM rollouts WHERE run_id = ? AND epoch = ? "
                           "AND status <> 'planned' GROUP BY task_id", [run_id, epoch]).fetchall()
    return {task_id: float(mean) for task_id, mean in rows}


def trajectories(catalog: Catalog, *, run_id: str, epoch: int) -> list[dict[str, Any]]:
    """Return one evaluation's trajectories, one per task (its lowest-reward rollout), read from the lake."""
    with catalog.read() as con:  # sql/prompt_reflections.sql reads the spans view
        rows = con.execute(sql_text("prompt_reflections"), {"run_id": run_id, "epoch": epoch}).fetchall()
    out = []
    for rollout_id, task_id, task, reward, status, error, calls, failed_tools in rows:
        out.append({"rollout_id": rollout_id, "task_id": task_id, "task": json.loads(task) if task else {},
                    "reward": reward, "status": status, "error": error,
                    "calls": [{**c, "messages": json_list(c.get("messages"))} for c in json.loads(calls or "[]")],
                    "failed_tools": json.loads(failed_tools or "[]")})
    return out


def call_of(trajectory: dict[str, Any], text: str) -> dict[str, Any] | None:
    """The model call a prompt text steered: the last call whose messages hold the text, else the last call."""
    calls = trajectory["calls"]
    for call in reversed(calls):
        if any(text and text in _content(m) for m in call["messages"]):
            return call
    return calls[-1] if calls else None


def _content(message: dict[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, list):  # content parts
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return str(content or "")


def as_failure(trajectory: dict[str, Any], text: str) -> dict[str, Any]:
    """A trajectory in the form a scripted critic gets it (``task, reward, status, error, messages, response``, plus
    ``agent`` and ``failed_tools``), for the component ``text``."""
    call = call_of(trajectory, text) or {"messages": [], "response": None, "agent": None}
    return {"rollout_id": trajectory["rollout_id"], "task_id": trajectory["task_id"], "task": trajectory["task"],
            "reward": trajectory["reward"], "status": trajectory["status"], "error": trajectory["error"],
            "messages": call["messages"], "response": call["response"], "agent": call.get("agent"),
            "failed_tools": trajectory["failed_tools"]}


def record(failure: dict[str, Any], *, max_chars: int = 600) -> dict[str, Any]:
    """One example of GEPA's reflective dataset: Inputs (task, agent, conversation), Generated Outputs, Feedback."""
    task = {k: v for k, v in failure["task"].items() if k != "id"}
    turns = [f"{m.get('role', '?')}: {_content(m)[:max_chars]}" for m in failure["messages"] if m.get("role") != "system"]
    inputs: dict[str, Any] = {"task": json.dumps(task, ensure_ascii=False)[:max_chars]}
    if failure.get("agent"):
        inputs["agent"] = failure["agent"]
    if turns[1:]:  # more than the question: the conversation so far, tool results included
        inputs["conversation"] = "\n".join(turns[-6:])
    reward = failure["reward"]
    feedback = [f"reward: {reward if reward is not None else 'none'} ({failure['status']})"]
    for tool in failure["failed_tools"]:
        feedback.append(f"tool {tool.get('tool')} failed: {(tool.get('error') or '').splitlines()[0][:max_chars] if tool.get('error') else 'error'}")
    if failure["error"]:
        feedback.append(f"error: {failure['error'].splitlines()[0][:max_chars]}")
    return {"Inputs": inputs, "Generated Outputs": (failure["response"] or "")[:max_chars], "Feedback": "; ".join(feedback)}


class ArclightAdapter:
    """GEPA's adapter: candidates are prompt versions, evaluations are rollouts, reflections come from the lake."""

    def __init__(self, *, catalog: Catalog, run_id: str, start: dict[str, PromptVersion], evaluate_fn: EvaluateFn,
                 critic: Critic, val_ids: list[str], success: float, max_prompt_chars: int, journal: Path | None = None):
        self.catalog, self.run_id, self.start = catalog, run_id, dict(start)
        self.evaluate_fn, self.critic, self.val_ids = evaluate_fn, critic, sorted(val_ids)
        self.success, self.max_prompt_chars, self.journal = success, max_prompt_chars, journal
        self.parent: dict[str, PromptVersion] = dict(start)  # the candidate GEPA reflected on last
        self.parent_epoch, self.iteration = -1, 0
        self.shown: dict[str, list[dict[str, Any]]] = {}  # component -> trajectories, as a scripted critic gets them
        self.critique: str | None = None
        self.proposals, self.rejected = 0, []
        self.errors: list[BaseException] = []  # GEPA logs and skips what these steps raise; the flow raises them after

    def versions_of(self, candidate: dict[str, str]) -> dict[str, PromptVersion]:
        """Each component's text as a catalog version: a known text is its version, a new one a child of the parent."""
        chosen = {}
        for name, text in candidate.items():
            parent = self.parent.get(name) or self.start[name]
            chosen[name], _ = prompts.add_candidate(self.catalog, name=name, text=text, parent=parent.version,
                                                    made_by=self.critic.made_by, critique=self.critique,
                                                    run_id=self.run_id, round=self.iteration)
        return chosen

    def evaluate(self, batch: list[dict[str, Any]], candidate: dict[str, str], capture_traces: bool = False) -> EvaluationBatch:
        """Run the candidate's prompts on the batch's tasks as rollouts; score each task by its mean reward."""
        chosen = self.versions_of(candidate)
        unique = list({t["id"]: t for t in batch}.values())
        epoch, per_task = self.evaluate_fn(chosen, unique)
        scores = [per_task.get(t["id"], 0.0) for t in batch]
        if sorted(t["id"] for t in batch) == self.val_ids:  # the validation split: the versions' scores in the catalog
            for version in chosen.values():
                prompts.set_score(self.catalog, version.version, score=sum(scores) / len(scores), tasks=len(scores))
        outputs = [{"task_id": t["id"], "epoch": epoch, "versions": prompts.version_ids(chosen)} for t in batch]
        return EvaluationBatch(outputs=outputs, scores=scores, trajectories=outputs if capture_traces else None)

    def make_reflective_dataset(self, candidate: dict[str, str], eval_batch: EvaluationBatch,
                                components_to_update: list[str]) -> dict[str, list[dict[str, Any]]]:
        """Per component, the batch's trajectories read from the lake: task, conversation, answer, reward, failures."""
        try:
            return self._reflective_dataset(candidate, eval_batch, components_to_update)
        except Exception as exc:
            self.errors.append(exc)
            raise

    def _reflective_dataset(self, candidate: dict[str, str], eval_batch: EvaluationBatch,
                            components_to_update: list[str]) -> dict[str, list[dict[str, Any]]]:
        epoch = eval_batch.trajectories[0]["epoch"]
        self.parent, self.parent_epoch = self.versions_of(candidate), epoch
        self.iteration += 1
        self.critique = None
        found = trajectories(self.catalog, run_id=self.run_id, epoch=epoch)
        self.shown = {name: [as_failure(t, candidate[name]) for t in found] for name in components_to_update}
        dataset = {name: [record(f) for f in shown] for name, shown in self.shown.items()}
        if self.journal is not None:  # what the reflection model read, per iteration
            self.journal.parent.mkdir(parents=True, exist_ok=True)
            with self.journal.open("a") as out:
                out.write(json.dumps({"iteration": self.iteration, "epoch": epoch,
                                      "parent": prompts.version_ids(self.parent), "dataset": dataset}) + "\n")
        return dataset

    def where(self) -> CallSite:
        """Where the critic's calls of this iteration are traced."""
        parents = ".".join(v.version for v in self.parent.values())  # a rollout id allows [A-Za-z0-9._:-]
        return CallSite(run_id=self.run_id, epoch=self.parent_epoch, parent_version=parents, round=self.iteration)

    def reflection_lm(self, prompt: str | list[dict[str, Any]]) -> str:
        """GEPA's reflection model (its ``LanguageModel``): the configured chat critic, traced like a critique."""
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        return self.critic.chat(messages, role="reflect", where=self.where(), k=self.proposals)

    def propose_new_texts(self, candidate: dict[str, str], reflective_dataset: Any,
                          components_to_update: list[str]) -> dict[str, str]:
        """GEPA's proposal step: a model critic answers GEPA's own reflection prompt about the reflective dataset; a
        scripted critic gets the failed trajectories of the minibatch. What is unusable is dropped and counted."""
        try:
            return self._proposals(candidate, reflective_dataset, components_to_update)
        except Exception as exc:
            self.errors.append(exc)
            raise

    def _proposals(self, candidate: dict[str, str], reflective_dataset: Any,
                   components_to_update: list[str]) -> dict[str, str]:
        from gepa.strategies.instruction_proposal import InstructionProposalSignature

        new = {}
        for name in components_to_update:
            if isinstance(self.critic, ModelCritic):
                if not reflective_dataset.get(name):
                    continue
                self.proposals += 1
                raw = self.reflection_lm(InstructionProposalSignature.prompt_renderer(
                    {"current_instruction_doc": candidate[name], "dataset_with_feedback": reflective_dataset[name],
                     "prompt_template": None}))
                proposed = [(raw, InstructionProposalSignature.output_extractor(raw.strip())["new_instruction"])]
            else:
                failed = [f for f in self.shown.get(name, []) if (f["reward"] if f["reward"] is not None else -1e308) < self.success]
                if not failed:
                    continue
                proposed = [(p.critique, p.text) for p in self.critic.propose(candidate[name], failed, 1, where=self.where())]
                self.proposals += len(proposed)
            for critique, text in proposed:
                cleaned = clean_prompt(text, max_chars=self.max_prompt_chars)
                why = usable(cleaned, candidate[name])
                if why is not None:
                    self.rejected.append({"parent": self.parent[name].version, "why": why, "text": (text or "")[:300]})
                    continue
                new[name], self.critique = cleaned, (critique or "")[:2000] or None
        return new
