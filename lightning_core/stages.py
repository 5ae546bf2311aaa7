"""The epoch's stages as plain functions (no Prefect): rollouts, ingest, triplets, train, redeploy.

``tasks/`` wraps each in a Prefect task and ``flows/`` chains them. Every stage reads and writes
the catalog and the lake, so any one can be re-run alone for a (run, epoch).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning_core import epoch as ep
from lightning_core.catalog import Catalog
from lightning_core.config import ArclightConfig
from lightning_core.runner import (AGENT, FAILED, INFRASTRUCTURE, INTERRUPTED, SUCCEEDED, TIMED_OUT, RolloutOutcome,
                                   RolloutSpec, RunnerSettings, run_rollout, settings_from_config)
from lightning_core.serving import redeploy_mode
from lightning_core.stack import Stack

log = logging.getLogger("arclight.stages")

_VERSION_NUMBER = re.compile(r"-v(\d+)$")


def runner_settings(config: ArclightConfig, stack: Stack, *, mode: str = "train", prompt_versions: list[str] | None = None,
                    prompt_texts: dict[str, Any] | None = None, temperature: float | None = None) -> RunnerSettings:
    """Return the settings every rollout of this stack uses (the agent is imported once, to fail early).

    The agent gets the serving version of each configured prompt, or the versions named in
    ``prompt_versions`` (ids such as ``system-v3``); ``prompt_texts`` maps names to versions
    (``PromptVersion``) chosen by the caller (prompt optimisation's candidates).
    """
    from lightning_core import prompts

    if stack.gateway is None:
        raise ValueError("rollouts need a gateway: open the stack with its model")
    chosen = prompts.resolve(Catalog.from_config(config), config, prompt_versions)
    chosen.update(prompt_texts or {})
    return settings_from_config(
        config, collector_url=stack.collector.url, gateway_url=stack.gateway.url, model=config.policies[0].name, mode=mode,
        resources=prompts.resources_with(config.rollouts.resources, chosen), prompt_versions=prompts.version_ids(chosen),
        temperature=temperature,
    )


def run_one_rollout(settings: RunnerSettings, spec: RolloutSpec, *, first_attempt: int = 0) -> RolloutOutcome:
    """Register each attempt with the gateway and run the rollout; return its outcome (the caller records it).

    A gateway that cannot register the rollout (down, restarting) fails it as an infrastructure failure: it runs
    again once the gateway is back.
    """
    import httpx

    from lightning_core.gateway_client import GatewayAdminError

    gateway = _shared_gateway_client(settings)

    def register(attempt: int) -> None:
        gateway.register_rollout(
            rollout_id=spec.rollout_id, run_id=spec.run_id, epoch=spec.epoch, task_id=spec.task_id, attempt=attempt
        )

    try:
        return run_rollout(settings, spec, first_attempt=first_attempt, before_attempt=register)
    except (httpx.HTTPError, GatewayAdminError) as exc:
        now = time.time()
        return RolloutOutcome(spec.rollout_id, FAILED, first_attempt, None,
                              f"the gateway at {settings.gateway_url} could not register the rollout: {exc}", now, now,
                              INFRASTRUCTURE)
    finally:
        with contextlib.suppress(httpx.HTTPError, GatewayAdminError):
            gateway.forget_rollout(spec.rollout_id)


def run_rollout_batch(
    settings: RunnerSettings, specs: list[RolloutSpec], *, first_attempts: dict[str, int], slot: threading.Semaphore,
) -> list[RolloutOutcome]:
    """Run a batch of rollouts (a GRPO group) side by side, each holding a ``slot`` while it runs; return their outcomes.

    Needs only the settings (service URLs and tokens), so it runs on a remote worker as well as in
    the flow; the flow stores the outcomes in the catalog (``record_rollouts``).
    """
    from concurrent.futures import ThreadPoolExecutor

    def one(spec: RolloutSpec) -> RolloutOutcome:
        with slot:
            return run_one_rollout(settings, spec, first_attempt=first_attempts.get(spec.rollout_id, 0))

    with ThreadPoolExecutor(max_workers=len(specs), thread_name_prefix="arclight-rollout") as pool:
        return list(pool.map(one, specs))


def record_rollouts(config: ArclightConfig, outcomes: list[RolloutOutcome]) -> None:
    """Store a batch's outcomes in the catalog, in one write (the flow's process owns the catalog)."""
    ep.record_outcomes(Catalog.from_config(config), outcomes)


def blame_outages(outcomes: list[RolloutOutcome], stack: Stack) -> list[RolloutOutcome]:
    """The outcomes, with every attempt that ran while a service of the stack was down or failing made an
    infrastructure failure: the agent may have caught the error and carried on (its reward then says nothing about
    the policy), and the gateway's spans of its calls may never have reached the lake."""
    blamed = []
    for o in outcomes:
        hit = stack.outages_during(o.started_at, o.finished_at) if o.status != INTERRUPTED else []
        if hit and o.error_kind != INFRASTRUCTURE:
            agent_said = f" (the agent reported: {o.error.splitlines()[0][:300]})" if o.error else ""
            o = dataclasses.replace(o, status=FAILED, error_kind=INFRASTRUCTURE,
                                    error=f"it ran while {hit[0].describe()}{agent_said}")
        blamed.append(o)
    return blamed


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
    from lightning_core.gateway_client import GatewayClient

    key = (settings.gateway_url, settings.gateway_token)
    with _gateway_clients_guard:
        if key not in _gateway_clients:
            _gateway_clients[key] = GatewayClient(settings.gateway_url, token=settings.gateway_token)
        return _gateway_clients[key]


def first_attempts(config: ArclightConfig, *, run_id: str, epoch: int) -> dict[str, int]:
    """Return, per rollout that already left spans (an interrupted run), the next attempt number.

    A rollout re-run after a crash gets a new attempt number, so the pipeline, which trains on
    each rollout's last attempt, never mixes the spans of the two runs.
    """
    with Catalog.from_config(config).read() as con:
        rows = con.execute(
            "SELECT rollout_id, max(attempt) FROM spans WHERE run_id = ? AND epoch = ? AND rollout_id IS NOT NULL GROUP BY rollout_id",
            [run_id, epoch],
        ).fetchall()
    return {rollout_id: (attempt or 0) + 1 for rollout_id, attempt in rows}


def ingest_barrier(config: ArclightConfig, stack: Stack, *, run_id: str, epoch: int, mode: str = "train") -> dict[str, int]:
    """Make every span of the epoch durable, then fail the succeeded rollouts whose spans say otherwise
    (``sql/arrivals.sql``): spans that never arrived and calls our side failed are infrastructure failures (they run
    again), an agent that recorded nothing is the agent's.

    Workers flush their own spans before reporting, so once the gateway has flushed its LLM-call
    spans the collector has acknowledged, and so stored, every span of the epoch. A collector that
    cannot store spans stops the epoch here with its reason and its log (``ServiceError``).
    """
    from lightning_core.pipeline import run_stage
    from lightning_core.runner import flush_outcome_spans
    from lightning_core.services import ServiceError

    check_collector(stack)
    flush_outcome_spans(run_id=run_id, epoch=epoch)
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
    catalog = Catalog.from_config(config)
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


def check_collector(stack: Stack) -> None:
    """Raise ``ServiceError`` with the collector's own reason and its log when it says it cannot store spans."""
    from lightning_core.services import ServiceError, health

    ok, reason, _ = health(stack.collector.health_url)
    if not ok:
        where = f"; its log is {stack.collector.log_path}" if stack.collector.log_path else ""
        raise ServiceError(
            f"the collector at {stack.collector.url} cannot store spans: {reason or 'it does not answer'}{where}. Spans "
            "it refuses are lost to training, so the run stopped instead of training on what is left: fix the lake "
            "(disk space, permissions, a folder that was removed) and run the same command again to resume")


class RunStopped(RuntimeError):
    """A sampling round that failed too much to train on; the message says what failed and what to do."""


def retry_infrastructure_failures(config: ArclightConfig, *, run_id: str, epoch: int, mode: str) -> list[str]:
    """Plan the rollouts of (run, epoch, mode) that our services failed to run again (status back to planned);
    return their ids. Their next attempt gets a new attempt number, so their earlier spans never mix in."""
    with Catalog.from_config(config).write() as con:
        ids = [r for (r,) in con.execute(
            "SELECT rollout_id FROM rollouts WHERE run_id = ? AND epoch = ? AND mode = ? AND status <> 'planned' "
            "AND error_kind = 'infrastructure' ORDER BY rollout_id", [run_id, epoch, mode]).fetchall()]
        if ids:
            con.execute("UPDATE rollouts SET status = 'planned', infra_failures = coalesce(infra_failures, 0) + 1 "
                        "WHERE run_id = ? AND epoch = ? AND mode = ? AND status <> 'planned' "
                        "AND error_kind = 'infrastructure'", [run_id, epoch, mode])
    return ids


def wait_for_services(stack: Stack, *, timeout_s: float) -> None:
    """Wait until every server of the stack answers (the supervisor restarts the dead ones); raise ``ServiceError``
    with the last reason after ``timeout_s``."""
    from lightning_core.services import ServiceError, health

    deadline = time.monotonic() + timeout_s
    while True:
        with stack.lock:  # not while the supervisor restarts one
            down = [(s, h) for s in stack.services() if not (h := health(s.health_url, timeout_s=5.0)).ok]
        if not down:
            return
        if time.monotonic() > deadline:
            service, seen = down[0]
            raise ServiceError(f"{service.name} at {service.url} is still down after {timeout_s:.0f} s: {seen.reason} "
                               f"(log {service.log_path or 'its own'})")
        time.sleep(1.0)


def record_incidents(config: ArclightConfig, stack: Stack, *, run_id: str, epoch: int) -> dict[str, Any]:
    """Store what our services did to the epoch (outages and restarts while it ran, rollouts run again, rollouts left
    out) in its ``incidents``; return it ({} when nothing happened)."""
    catalog = Catalog.from_config(config)
    with catalog.read(spans=False) as con:
        started = con.execute("SELECT epoch(started_at) FROM epochs WHERE run_id = ? AND epoch = ?",
                              [run_id, epoch]).fetchall()
        retried, recovered, left_out = con.execute(
            "SELECT count(*) FILTER (WHERE infra_failures > 0), "
            "count(*) FILTER (WHERE infra_failures > 0 AND coalesce(error_kind, '') <> 'infrastructure'), "
            "count(*) FILTER (WHERE status <> 'planned' AND error_kind = 'infrastructure') "
            "FROM rollouts WHERE run_id = ? AND epoch = ? AND mode = 'train'", [run_id, epoch]).fetchall()[0]
    since = started[0][0] if started and started[0][0] is not None else 0.0
    outages = [o for o in stack.outages if o.ended is None or o.ended >= since]
    if not (outages or retried or left_out):
        return {}
    incidents = {"outages": [o.describe() for o in outages], "retried": retried, "recovered": recovered,
                 "left_out": left_out}
    with catalog.write() as con:
        con.execute("UPDATE epochs SET incidents = ? WHERE run_id = ? AND epoch = ?",
                    [json.dumps(incidents), run_id, epoch])
    return incidents


def describe_incidents(incidents: dict[str, Any]) -> str:
    """One paragraph of what our services did to an epoch (``record_incidents``)."""
    parts = list(incidents.get("outages") or [])
    if incidents.get("retried"):
        parts.append(f"{incidents['retried']} rollouts our services failed ran again "
                     f"({incidents['recovered']} then finished)")
    if incidents.get("left_out"):
        parts.append(f"{incidents['left_out']} rollouts were left out (failed by our services every time): their "
                     "groups did not train")
    return "; ".join(parts)


def check_round(config: ArclightConfig, *, run_id: str, epoch: int, mode: str, sampling_round: int | None,
                logs: list[str]) -> dict[str, Any]:
    """Count the round's failures; raise ``RunStopped`` when at least ``rollouts.stop_at_failed_share`` of its
    rollouts failed or timed out (after retries): training on what is left, or drawing more tasks, would hide it."""
    round_filter = "" if sampling_round is None else "AND coalesce(sampling_round, 0) = ?"
    args = [run_id, epoch, mode] + ([] if sampling_round is None else [sampling_round])
    with Catalog.from_config(config).read(spans=False) as con:
        rows = con.execute(
            f"SELECT status, coalesce(error_kind, ''), split_part(coalesce(error, ''), chr(10), 1) AS first_line, count(*) "
            f"FROM rollouts WHERE run_id = ? AND epoch = ? AND mode = ? {round_filter} GROUP BY ALL ORDER BY 4 DESC",
            args).fetchall()
    total = sum(n for *_, n in rows)
    failed = [(kind, line, n) for status, kind, line, n in rows if status in (FAILED, TIMED_OUT)]
    n_failed = sum(n for *_, n in failed)
    by_kind: dict[str, int] = {}
    for kind, _, n in failed:
        by_kind[kind or "agent"] = by_kind.get(kind or "agent", 0) + n
    result = {"rollouts": total, "failed": n_failed, "by_kind": by_kind}
    share = config.rollouts.stop_at_failed_share
    if total and n_failed / total >= share:
        kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(by_kind.items(), key=lambda kv: -kv[1]))
        common = "; ".join(f"{line[:200] or '(no message)'} (x{n})" for _, line, n in failed[:3])
        where = f"sampling round {sampling_round} of epoch {epoch}" if sampling_round is not None else f"{mode} epoch {epoch}"
        raise RunStopped(
            f"{n_failed} of {total} rollouts of {where} (run {run_id}) failed or timed out ({kinds}), at least "
            f"rollouts.stop_at_failed_share = {share:g} of them, so the run stopped instead of training on the rest or "
            f"drawing more tasks. Most common: {common}. Logs: {', '.join(logs) or 'none'}. Fix the cause and run the "
            "same command again: completed stages are kept and this epoch resumes")
    return result


def materialize(config: ArclightConfig, *, run_id: str, epoch: int):
    """Run the SQL pipeline for (run, epoch): triplets per policy, with advantages."""
    from lightning_core.pipeline import materialize_triplets

    return materialize_triplets(config, run_id=run_id, epoch=epoch)


def train(config: ArclightConfig, *, run_id: str, epoch: int) -> list[Any]:
    """Train every policy on its triplets of the epoch; return the trainer's results."""
    from lightning_core.serving import model_dir
    from lightning_core.trainer.train import train_policies

    return train_policies(config, run_id=run_id, epoch=epoch, base_model_dir=model_dir(config))


def version_number(version: str) -> int:
    """Return N of a version id ``<policy>-vN``."""
    match = _VERSION_NUMBER.search(version)
    if not match:
        raise ValueError(f"policy version {version!r} is not of the form <policy>-v<N>")
    return int(match.group(1))


@dataclass
class Redeployed:
    """One policy version that now serves."""

    policy: str
    version: str
    first_answer_s: float


def deploy_latest(config: ArclightConfig, stack: Stack, *, revived: list[str] | None = None) -> list[Redeployed]:
    """Make the newest recorded version of every policy serve (no-op where it already does); replicas restarted
    meanwhile (``revived``, default: those this call restarts) get it back."""
    from lightning_core.redeploy import deploy_adapter, deploy_full_weights, merge_adapter, prune_merged, restore_adapter
    from lightning_core.serving import model_dir, replica_group, serving_dtype
    from lightning_core.trainer.versions import latest_version

    catalog = Catalog.from_config(config)
    revived = revive_replicas(config, stack) if revived is None else revived
    gateway = stack.gateway_client(config)
    mode = redeploy_mode(config)
    replicas = [r.url for r in stack.replicas]
    deployed = []
    try:
        serving = gateway.policies()["policies"]
        for policy in config.policies:
            latest = latest_version(catalog, policy=policy.name)
            if latest is None:
                continue
            number = version_number(latest["version"])
            full = latest.get("kind") == "full" or mode == "merged"
            # grouped replicas (a frozen agent, several policies): only the policy's own get its weights
            own = [r.url for r in stack.replicas if replica_group(r) == policy.name] or replicas
            if (serving.get(policy.name) or {}).get("version") == number:
                if not full and revived:  # restarted replicas catch up with the adapter the gateway serves
                    restore_adapter(replicas=revived, policy=policy.name, adapter_dir=latest["path"], version=number,
                                    verify_prompt=config.serving.verify_prompt)
                if not (full and set(revived) & set(own)):
                    continue
                own = [url for url in own if url in revived]  # a restarted replica of the policy serves base weights
            if full:
                weights = Path(latest["path"])
                if latest.get("kind") != "full":
                    weights = merge_adapter(base_model_dir=model_dir(config), adapter_dir=weights,
                                            out_dir=weights.with_name(f"{weights.name}.merged"), dtype=serving_dtype(config))
                d = deploy_full_weights(gateway=gateway, replicas=own, policy=policy.name, model_dir=weights,
                                        version=number, verify_prompt=config.serving.verify_prompt)
                if latest.get("kind") != "full":
                    prune_merged(weights, keep=config.serving.keep_versions)
            else:
                d = deploy_adapter(gateway=gateway, replicas=replicas, policy=policy.name, adapter_dir=latest["path"],
                                   version=number, keep_versions=config.serving.keep_versions,
                                   verify_prompt=config.serving.verify_prompt)
            deployed.append(Redeployed(policy.name, latest["version"], d.first_answer_s))
    finally:
        gateway.close()
    return deployed


def revive_replicas(config: ArclightConfig, stack: Stack) -> list[str]:
    """Restart the vLLM replicas this process started that have exited (an OOM kill, a crash); return their URLs.

    A restarted replica serves the base model and no adapter; ``deploy_latest`` brings it up to the
    serving versions before the next rollouts. Replicas someone else runs are left to them. Each
    restart is recorded as an outage of the stack (rollouts that ran meanwhile are not the agent's).
    """
    from urllib.parse import urlparse

    from lightning_core.serving import start_vllm
    from lightning_core.stack import Outage

    revived = []
    with stack.lock:
        for i, replica in enumerate(stack.replicas):
            if replica.owned and not replica.alive():
                log.warning("vLLM replica %s at %s exited with status %s: restarting it on the same port (log: %s)",
                            replica.name, replica.url, replica.process.returncode, replica.log_path)
                outage = Outage(replica.name, replica.last_seen or time.time(),
                                f"exited with status {replica.process.returncode}")
                stack.outages.append(outage)
                replica.stop()  # what it left running in its process group (the engine core)
                stack.replicas[i] = start_vllm(config, port=urlparse(replica.url).port, name=replica.name,
                                               log_dir=replica.log_path.parent if replica.log_path else None)
                outage.ended, outage.restarted = time.time(), True
                revived.append(replica.url)
    return revived


def serving_versions(config: ArclightConfig, stack: Stack) -> dict[str, str]:
    """Return the version each policy serves now ('base' before any training)."""
    gateway = stack.gateway_client(config)
    try:
        serving = gateway.policies()["policies"]
    finally:
        gateway.close()
    labels = {}
    for p in config.policies:
        number = (serving.get(p.name) or {}).get("version") or 0
        labels[p.name] = f"{p.name}-v{number}" if number else "base"
    return labels


def summary_rows(config: ArclightConfig) -> list[dict[str, Any]]:
    """Return one row per epoch of the run: rewards, rollout outcomes, versions."""
    catalog = Catalog.from_config(config)
    with catalog.read(spans=False) as con:
        rows = con.execute(
            """
            SELECT e.epoch, e.status, e.policy_version, e.new_version, e.tasks_sampled, e.informative_groups,
                   avg(r.reward) FILTER (WHERE r.status = 'succeeded') AS reward_mean,
                   count(*) FILTER (WHERE r.status = 'succeeded') AS succeeded,
                   count(*) FILTER (WHERE r.status = 'failed') AS failed,
                   count(*) FILTER (WHERE r.status = 'timed_out') AS timed_out,
                   count(r.rollout_id) AS rollouts,
                   count(*) FILTER (WHERE r.infra_failures > 0) AS infra_retried,
                   count(*) FILTER (WHERE r.status <> 'planned' AND r.error_kind = 'infrastructure') AS infra_left_out,
                   any_value(e.incidents) AS incidents
            FROM epochs e LEFT JOIN rollouts r ON r.run_id = e.run_id AND r.epoch = e.epoch AND r.mode = 'train'
            WHERE e.run_id = ?
            GROUP BY ALL ORDER BY e.epoch
            """,
            [config.run_name],
        ).fetchall()
    keys = ("epoch", "status", "policy_version", "new_version", "tasks_sampled", "informative_groups", "reward_mean",
            "succeeded", "failed", "timed_out", "rollouts", "infra_retried", "infra_left_out", "incidents")
    rows = [dict(zip(keys, row)) for row in rows]
    for row in rows:
        row["incidents"] = json.loads(row["incidents"]) if row["incidents"] else {}
    return rows


def eval_run_id(config: ArclightConfig) -> str:
    """Return the run that holds a project's evaluation rollouts."""
    return f"{config.run_name}.eval"


def eval_epoch(catalog: Catalog, *, run_id: str, label: str) -> int:
    """Return the eval epoch of ``label`` (the versions evaluated): its earlier one, or a new one."""
    with catalog.read(spans=False) as con:
        rows = con.execute("SELECT epoch, policy_version FROM epochs WHERE run_id = ? ORDER BY epoch", [run_id]).fetchall()
    for number, evaluated in rows:
        if evaluated == label:
            return number
    number = rows[-1][0] + 1 if rows else 0
    ep.set_epoch_status(catalog, run_id=run_id, epoch=number, status="planned", policy_version=label)
    return number


def eval_label(config: ArclightConfig, serving: dict[str, str], *, tasks: int | None = None,
               prompt_versions: dict[str, str] | None = None) -> str:
    """Name an evaluation by the versions serving (``calc-v5``, ``base``), then the prompt versions used
    (``base system-v2``), plus ``@N`` on a task subset."""
    label = ",".join(serving.values())
    if prompt_versions:
        label += " " + ",".join(prompt_versions[name] for name in sorted(prompt_versions))
    if tasks is not None and tasks != config.rollouts.eval_tasks:
        label += f"@{tasks}"
    return label


def record_eval(config: ArclightConfig, *, epoch: int, label: str) -> dict[str, Any]:
    """Mark an eval epoch complete, noting how many training epochs the evaluated policy had; return its result."""
    catalog = Catalog.from_config(config)
    with catalog.read(spans=False) as con:
        row = con.execute("SELECT stats FROM epochs WHERE run_id = ? AND epoch = ?", [eval_run_id(config), epoch]).fetchall()
    stats = json.loads(row[0][0]) if row and row[0][0] else {}
    if "after_epochs" not in stats:  # an evaluation reused later keeps the epoch count of its first run
        stats["after_epochs"] = sum(1 for r in summary_rows(config) if r["status"] == "completed")
        stats["dataset"] = str(config.rollouts.eval_dataset)
    ep.set_epoch_status(catalog, run_id=eval_run_id(config), epoch=epoch, status="completed", stats=stats)
    return {**eval_result(config, epoch=epoch, label=label), "after_epochs": stats["after_epochs"]}


def eval_curve(config: ArclightConfig) -> list[dict[str, Any]]:
    """Return the run's completed evaluations on its eval dataset, in training order: epochs trained, label,
    tasks, success, reward."""
    success = config.trainer.success_reward
    with Catalog.from_config(config).read(spans=False) as con:
        rows = con.execute(
            """
            SELECT CAST(json_extract(e.stats, '$.after_epochs') AS BIGINT) AS after_epochs, e.policy_version AS label,
                   e.epoch AS eval_epoch, count(r.rollout_id) AS tasks,
                   avg(coalesce(r.reward, 0)) AS reward_mean,
                   count(*) FILTER (WHERE r.reward >= $success) / count(r.rollout_id) AS success_rate
            FROM epochs e JOIN rollouts r ON r.run_id = e.run_id AND r.epoch = e.epoch AND r.mode = 'eval'
                 AND coalesce(r.error_kind, '') <> 'infrastructure'  -- our failures score nothing (eval_result)
            WHERE e.run_id = $run AND e.status = 'completed' AND json_extract(e.stats, '$.after_epochs') IS NOT NULL
              AND coalesce(json_extract_string(e.stats, '$.dataset'), $dataset) = $dataset
            GROUP BY ALL ORDER BY after_epochs, eval_epoch
            """,
            {"success": success, "run": eval_run_id(config), "dataset": str(config.rollouts.eval_dataset)},
        ).fetchall()
    keys = ("after_epochs", "label", "eval_epoch", "tasks", "reward_mean", "success_rate")
    return [dict(zip(keys, row)) for row in rows]


def eval_result(config: ArclightConfig, *, epoch: int, label: str) -> dict[str, Any]:
    """Return reward and success rate of one evaluation: the agent's failures count as 0; tasks our services failed
    every time (``left_out``) are not scored, since they say nothing about the policy."""
    success = config.trainer.success_reward
    with Catalog.from_config(config).read(spans=False) as con:
        n, reward, successes, failed, left_out = con.execute(
            "SELECT count(*) FILTER (WHERE NOT ours), avg(coalesce(reward, 0)) FILTER (WHERE NOT ours), "
            "count(*) FILTER (WHERE reward >= ? AND NOT ours), count(*) FILTER (WHERE status <> 'succeeded' AND NOT ours), "
            "count(*) FILTER (WHERE ours) "
            "FROM (SELECT *, coalesce(error_kind, '') = 'infrastructure' AS ours FROM rollouts "
            "      WHERE run_id = ? AND epoch = ? AND mode = 'eval')",
            [success, eval_run_id(config), epoch],
        ).fetchall()[0]
    return {"label": label, "eval_epoch": epoch, "tasks": n, "reward_mean": reward,
            "success_rate": (successes / n) if n else None, "failed": failed, "left_out": left_out}


__all__ = [
    "FAILED", "SUCCEEDED", "runner_settings", "run_one_rollout", "run_rollout_batch", "record_rollouts", "ingest_barrier", "materialize", "train",
    "deploy_latest", "serving_versions", "summary_rows", "version_number",
]
