"""Who writes prompt optimisation's edits, as GEPA's reflection step: a chat model (the local vLLM through the gateway,
traced under the search's run, or a hosted API) asked GEPA's own reflection prompt about the failed trajectories;
or a scripted function (rule-based edits) given those trajectories."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Union

from lightning_core import semconv
from lightning_core.config import ArclightConfig
from lightning_core.apo.search import ApoError

log = logging.getLogger("arclight.apo")


@dataclass(frozen=True)
class Proposal:
    """One edit a critic proposes: the critique it applies and the new prompt."""

    critique: str
    text: str


@dataclass(frozen=True)
class CallSite:
    """Where a critic's calls are traced: the optimisation run, the evaluation epoch they critique, the parent."""

    run_id: str
    epoch: int
    parent_version: str
    round: int


class ModelCritic:
    """A chat model answers GEPA's reflection prompt (one call per proposal), each call traced.

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

    def chat(self, messages: list[dict[str, Any]], *, role: str, where: CallSite, k: int = 0) -> str:
        """Ask the critic's model one question, traced with ``role``; GEPA's reflection model calls this."""
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
        from lightning_core.rollouts.runner import load_agent

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


# What GEPA's adapter asks for an edit: a model critic answers GEPA's reflection prompt, a scripted one gets the failures.
Critic = Union[ModelCritic, ScriptedCritic]


def make_critic(config: ArclightConfig, *, gateway_client, collector_url: str, collector_token: str | None) -> Critic:
    """Return the critic the config names."""
    if config.prompt_optimization.critic.kind == "scripted":
        return ScriptedCritic(config)
    return ModelCritic(config, gateway_client=gateway_client, collector_url=collector_url, collector_token=collector_token)
