"""The epoch's stages as plain functions (no Prefect): rollouts, ingest, triplets, train (redeploy: ``deploy``).

``tasks/`` wraps each in a Prefect task and ``flows/`` chains them. Every stage reads and writes
the catalog and the lake, so any one can be re-run alone for a (run, epoch).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
import socket
import threading
import time
from typing import Any

from lightning_core.epoch import bookkeeping as ep
from lightning_core.epoch.context import RunContext
from lightning_core.rollouts.runner import (AGENT, FAILED, INFRASTRUCTURE, RolloutOutcome, RolloutSpec, RunnerSettings,
                                            rollout_seed, run_rollout, settings_from_config)
from lightning_core.epoch.failures import RunStopped, check_collector

log = logging.getLogger("arclight.stages")



def runner_settings(ctx: RunContext, *, mode: str = "train", prompt_versions: list[str] | None = None,
                    prompt_texts: dict[str, Any] | None = None, temperature: float | None = None) -> RunnerSettings:
    """Return the settings every rollout of this stack uses (the agent is imported once, to fail early).

    The agent gets the serving version of each configured prompt, or the versions named in
    ``prompt_versions`` (ids such as ``system-v3``); ``prompt_texts`` maps names to versions
    (``PromptVersion``) chosen by the caller (prompt optimisation's candidates).
    """
    from lightning_core.apo import prompts

    config, stack = ctx.config, ctx.services
    if stack.gateway is None:
        raise ValueError("rollouts need a gateway: open the stack with its model")
    chosen = prompts.resolve(ctx.catalog, config, prompt_versions)
    chosen.update(prompt_texts or {})
    return settings_from_config(
        config, collector_url=stack.collector.url, gateway_url=stack.gateway.url, model=config.policies[0].name, mode=mode,
        resources=prompts.resources_with(config.rollouts.resources, chosen), prompt_versions=prompts.version_ids(chosen),
        temperature=temperature, gateway_token=stack.gateway.token,
    )


def run_one_rollout(settings: RunnerSettings, spec: RolloutSpec, *, first_attempt: int = 0) -> RolloutOutcome:
    """Register each attempt with the gateway and run the rollout; return its outcome (the caller records it).

    A gateway that cannot register the rollout (down, restarting, answering 5xx) fails the attempt that was being
    registered as an infrastructure failure: it runs again once the gateway is back. A gateway that refuses the
    registration (a 4xx) is neither the agent's failure nor an outage, and no retry would change its answer: the run
    stops with the gateway's reason (``RunStopped``). The outcome carries the model-call spans the gateway recorded
    for its last attempt (``gateway_spans``, what forgetting the rollout answers), which the lake should hold.
    """
    import httpx

    from lightning_core.serving.client import GatewayAdminError

    gateway = _shared_gateway_client(settings)
    registering = first_attempt

    def register(attempt: int) -> None:
        nonlocal registering
        registering = attempt
        gateway.register_rollout(
            rollout_id=spec.rollout_id, run_id=spec.run_id, epoch=spec.epoch, task_id=spec.task_id, attempt=attempt,
            seed=rollout_seed(settings, spec, attempt),
        )

    recorded = None
    try:
        outcome = run_rollout(settings, spec, first_attempt=first_attempt, before_attempt=register)
    except GatewayAdminError as exc:
        if exc.status is not None and 400 <= exc.status < 500:
            raise RunStopped(
                f"the gateway at {settings.gateway_url} refused to register rollout {spec.rollout_id!r} of task "
                f"{spec.task_id!r} (attempt {registering}): "
                + refused_registration(exc, gateway_url=settings.gateway_url, policies=[settings.model])) from None
        return _registration_failed(settings, spec, attempt=registering, error=exc)
    except httpx.HTTPError as exc:
        return _registration_failed(settings, spec, attempt=registering, error=exc)
    finally:
        with contextlib.suppress(httpx.HTTPError, GatewayAdminError):
            recorded = gateway.forget_rollout(spec.rollout_id)
    return dataclasses.replace(outcome, gateway_spans=recorded)


def refused_registration(error: Exception, *, gateway_url: str, policies: list[str]) -> str:
    """The gateway's refusal of a registration (a 4xx), and what to do: a wrong token, a gateway of another config or
    an endpoint that is no gateway are settings to fix; only a refusal no setting explains is ours to hear about."""
    status, text = getattr(error, "status", None), str(error)
    if status == 401:
        advice = (f"set gateway.token (or ARCLIGHT_GATEWAY_TOKEN) to the token the gateway at {gateway_url} was started "
                  "with (gateway.token in its config, or its --token)")
    elif status == 403:
        advice = (f"the gateway at {gateway_url} takes admin calls only with its own token: set gateway.token here and "
                  "there (a gateway without one answers only requests addressed to localhost or an IP address, so "
                  "gateway.endpoint must name it so)")
    elif status == 400 and "is not served here" in text:
        advice = (f"the config's policies ({', '.join(policies)}) are not the ones the gateway at {gateway_url} serves: "
                  "gateway.endpoint names a gateway started for another config; point it at this project's gateway, "
                  "or leave it unset so that the command starts one")
    elif status in (404, 405):
        advice = (f"gateway.endpoint ({gateway_url}) is not an Arclight gateway (it has no POST /admin/rollouts): set it "
                  "to the URL `arclight serve` or `arclight up` printed, without /v1")
    else:
        return (f"{text}. This is neither the agent's failure nor an outage, and running it again would be refused the "
                "same way, so the run stopped. Completed stages are kept; report this with the task's id")
    return (f"{text}. The run stopped: a setting is wrong, and neither the agent nor an outage is to blame; "
            f"{advice}. Completed stages are kept")


def _registration_failed(settings: RunnerSettings, spec: RolloutSpec, *, attempt: int, error: Exception) -> RolloutOutcome:
    now = time.time()
    return RolloutOutcome(spec.rollout_id, FAILED, attempt, None,
                          f"the gateway at {settings.gateway_url} could not register the rollout: {error}", now, now,
                          INFRASTRUCTURE)


def run_rollout_batch(
    settings: RunnerSettings, specs: list[RolloutSpec], *, first_attempts: dict[str, int], slot: threading.Semaphore,
) -> list[RolloutOutcome]:
    """Run a batch of rollouts (a GRPO group) side by side, each holding a ``slot`` while it runs; return their outcomes.

    Needs only the settings (service URLs and tokens), so it runs on a remote worker as well as in
    the flow; the flow stores the outcomes in the catalog (``record_rollouts``).
    """
    from concurrent.futures import ThreadPoolExecutor

    from lightning_core.common.services import ServiceError
    from lightning_core.rollouts.runner import flush_outcome_spans

    def one(spec: RolloutSpec) -> RolloutOutcome:
        with slot:
            return run_one_rollout(settings, spec, first_attempt=first_attempts.get(spec.rollout_id, 0))

    with ThreadPoolExecutor(max_workers=len(specs), thread_name_prefix="arclight-rollout") as pool:
        # each thread in this one's context: a rollout ends with the run that started it (stopping.run_scope)
        outcomes = [f.result() for f in [pool.submit(contextvars.copy_context().run, one, spec) for spec in specs]]
    # the outcome spans leave from this process, which may be a Dask or Ray worker the flow cannot flush
    for run_id, epoch in {(s.run_id, s.epoch) for s in specs}:
        if not flush_outcome_spans(run_id=run_id, epoch=epoch):
            raise ServiceError(f"the outcome spans of epoch {epoch}'s rollouts could not be delivered to the collector "
                               f"at {settings.collector_url} from the worker on {socket.gethostname()} (its exporter "
                               "gave up retrying): the lake would miss how they ended, so the run stopped instead of "
                               "training on what arrived. Start the collector again, or mend the network between the "
                               "workers and it.")
    return outcomes


def record_rollouts(ctx: RunContext, outcomes: list[RolloutOutcome]) -> None:
    """Store a batch's outcomes in the catalog, in one write (the flow's process owns the catalog)."""
    ep.record_outcomes(ctx.catalog, outcomes)


def rollout_batches(specs: list[RolloutSpec], *, size: int) -> list[list[RolloutSpec]]:
    """Pack rollouts into batches of whole groups, up to ``size`` rollouts unless one group is larger."""
    groups: dict[str, list[RolloutSpec]] = {}
    for spec in specs:
        groups.setdefault(spec.group_id, []).append(spec)
    batches: list[list[RolloutSpec]] = []
    for group in groups.values():
        if batches and len(batches[-1]) + len(group) <= size:
            batches[-1].extend(group)
        else:
            batches.append(list(group))
    return batches


_gateway_clients: dict[tuple[str, str | None], Any] = {}
_gateway_clients_guard = threading.Lock()


def _shared_gateway_client(settings: RunnerSettings):
    """One admin client per gateway for all rollouts of this process (a new one cost ~37 ms CPU each)."""
    from lightning_core.serving.client import GatewayClient

    key = (settings.gateway_url, settings.gateway_token)
    with _gateway_clients_guard:
        if key not in _gateway_clients:
            _gateway_clients[key] = GatewayClient(settings.gateway_url, token=settings.gateway_token)
        return _gateway_clients[key]


def first_attempts(ctx: RunContext, *, run_id: str, epoch: int) -> dict[str, int]:
    """Return, per rollout that already left spans (an interrupted run), the next attempt number.

    A rollout re-run after a crash gets a new attempt number, so the pipeline, which trains on
    each rollout's last attempt, never mixes the spans of the two runs.
    """
    with ctx.catalog.read() as con:
        rows = con.execute(
            "SELECT rollout_id, max(attempt) FROM spans WHERE run_id = ? AND epoch = ? AND rollout_id IS NOT NULL GROUP BY rollout_id",
            [run_id, epoch],
        ).fetchall()
    return {rollout_id: (attempt or 0) + 1 for rollout_id, attempt in rows}


def ingest_barrier(ctx: RunContext, *, run_id: str, epoch: int, mode: str = "train") -> dict[str, int]:
    """Make every span of the epoch durable, then fail the succeeded rollouts whose spans say otherwise
    (``sql/arrivals.sql``): spans that never arrived and calls our side failed are infrastructure failures (they run
    again), an agent that recorded nothing is the agent's.

    Workers flush their own spans before reporting, so once the gateway has flushed its LLM-call
    spans the collector has acknowledged, and so stored, every span of the epoch. A collector that
    cannot store spans stops the epoch here with its reason and its log (``ServiceError``); one that
    does not answer is waited for as long as a server's start may take (``serving.startup_timeout_s``).
    """
    from lightning_core.pipeline.steps import run_stage
    from lightning_core.rollouts.runner import flush_outcome_spans
    from lightning_core.common.services import ServiceError

    config, stack = ctx.config, ctx.services
    check_collector(stack, wait_s=config.serving.startup_timeout_s)
    if not flush_outcome_spans(run_id=run_id, epoch=epoch):  # those the flow's own process recorded
        check_collector(stack)
        raise ServiceError(f"the outcome spans of epoch {epoch}'s rollouts could not be delivered to the collector at "
                           f"{stack.collector.url} (its log: {stack.collector.log_path or 'its own'}); the epoch stopped "
                           "here: run the same command again to resume it")
    if stack.gateway is not None:
        gateway = stack.gateway_client(config)
        try:
            flushed = gateway.flush()
        finally:
            gateway.close()
        if not flushed:
            check_collector(stack)
            raise ServiceError(
                f"the gateway could not deliver the spans of epoch {epoch}'s model calls to the collector at "
                f"{stack.collector.url} (gateway log: {stack.gateway.log_path or 'its own'}; collector log: "
                f"{stack.collector.log_path or 'its own'}). The epoch's triplets would miss calls, so it stopped here: "
                "run the same command again to resume it")
    catalog = ctx.catalog
    with catalog.write(spans=True) as con:
        rows = run_stage(con, "arrivals", params={"run_id": run_id, "epoch": epoch, "mode": mode}).fetchall()
        verdicts = {r[0]: (r[-1], r[5]) for r in rows if r[-1] is not None}
        lost = [rid for rid, (v, _) in verdicts.items() if v == "spans_lost"]
        failures = [
            (FAILED, INFRASTRUCTURE,
             f"its spans never reached the lake: the collector at {stack.collector.url} did not store them", rid)
            if verdict == "spans_lost" else
            (FAILED, INFRASTRUCTURE, f"a model call failed on our side: {(error or 'vLLM could not answer')[:500]}", rid)
            if verdict == "upstream_failed" else
            (FAILED, AGENT, "the agent produced no spans: no model calls, tools, messages or rewards were recorded", rid)
            for rid, (verdict, error) in verdicts.items()
        ]
        if failures:
            con.executemany("UPDATE rollouts SET status = ?, error_kind = ?, error = ? WHERE rollout_id = ?", failures)
    if lost:
        log.warning("epoch %s: the spans of %d rollouts never reached the lake (%s ...): they run again", epoch,
                    len(lost), ", ".join(lost[:3]))
    return ep.rollout_counts(catalog, run_id=run_id, epoch=epoch, mode=mode)


def materialize(ctx: RunContext, *, run_id: str, epoch: int):
    """Run the SQL pipeline for (run, epoch): triplets per policy, with advantages."""
    from lightning_core.pipeline.triplets import materialize_triplets

    return materialize_triplets(ctx.config, run_id=run_id, epoch=epoch, catalog=ctx.catalog)


def train(ctx: RunContext, *, run_id: str, epoch: int, abandon: threading.Event | None = None) -> list[Any]:
    """Train every policy on its triplets of the epoch; return the trainer's results. With ``serving.sleep_mode`` the
    vLLM servers sleep meanwhile (their GPU memory goes to the trainer) and wake before the redeploy.

    Training stops before its next micro-batch once a stop is asked for (Ctrl-C) or ``abandon`` is set (the flow
    left while this ran beside the next epoch's rollouts, in a thread of its own)."""
    from lightning_core.common import stopping
    from lightning_core.serving.vllm import asleep, model_dir
    from lightning_core.trainer.train import train_policies

    config = ctx.config
    sampled = ep.sampling_counts(ctx.catalog, run_id=run_id, epoch=epoch)
    base = model_dir(config)
    executor = None
    if config.trainer.executor == "ray":  # on a train host: a Ray task placed by trainer.ray_resources
        from lightning_core.epoch.train_hosts import ray_executor

        executor = ray_executor(config)
    # serving.sleep_mode: vLLM's weights and KV cache leave the GPU while the trainer needs it
    sleeping = asleep([r.url for r in ctx.stack.replicas]) if config.serving.sleep_mode and ctx.stack else contextlib.nullcontext()
    with _sleeping_on_purpose(ctx.stack if config.serving.sleep_mode else None), sleeping:
        return train_policies(config, run_id=run_id, epoch=epoch, base_model_dir=base, catalog=ctx.catalog,
                              epoch_metrics={f"sampling/{k}": float(v) for k, v in sampled.items()},
                              should_stop=lambda: stopping.stopping() or (abandon is not None and abandon.is_set()),
                              executor=executor)


@contextlib.contextmanager
def _sleeping_on_purpose(stack):
    """Tell the supervisor that the replicas sleep on purpose (it does not probe them meanwhile)."""
    if stack is None:
        yield
        return
    stack.sleeping = True
    try:
        yield
    finally:
        stack.sleeping = False
