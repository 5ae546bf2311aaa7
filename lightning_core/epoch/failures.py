"""Our own failures are never training data: the rollouts a service outage failed, the ingest barrier's verdicts on
them, running them again once the services are back, and stopping a run that cannot go on (a collector that
cannot store spans, a round in which most rollouts failed). See docs/failures.md."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from typing import Any

from lightning_core.epoch.context import RunContext
from lightning_core.rollouts.runner import FAILED, INFRASTRUCTURE, INTERRUPTED, TIMED_OUT, RolloutOutcome
from lightning_core.epoch.stack import Stack


log = logging.getLogger("arclight.failures")


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


def settle_blame(ctx: RunContext, *, run_id: str, epoch: int, mode: str, sampling_round: int | None = None) -> int:
    """Before a round's rollouts are judged: let the supervisor look at every server until none is in doubt (an
    attached server counts as down only after a few missed checks, and a stuck vLLM after ``serving.stuck_after_s``),
    then make every recorded attempt of the round that ran during an outage our failure -- also those recorded
    before the outage was seen (an agent that caught the error and returned 0 may have finished its group by then).
    Return how many were blamed now."""
    stack = ctx.services
    if stack.supervisor is not None:
        stack.supervisor.settle()
    stack.raise_failure()
    round_filter, args = _round_filter(sampling_round)
    with ctx.catalog.read(spans=False) as con:
        rows = con.execute(
            f"SELECT rollout_id, status, attempt, reward, error, epoch(started_at), epoch(finished_at), error_kind "
            f"FROM rollouts WHERE run_id = ? AND epoch = ? AND mode = ? AND status <> 'planned' "
            f"AND coalesce(error_kind, '') <> 'infrastructure' AND started_at IS NOT NULL {round_filter}",
            [run_id, epoch, mode, *args]).fetchall()
    recorded = [RolloutOutcome(*row) for row in rows]
    blamed = [o for o in blame_outages(recorded, stack) if o.error_kind == INFRASTRUCTURE]
    if blamed:
        with ctx.catalog.write() as con:
            con.executemany("UPDATE rollouts SET status = ?, error_kind = ?, error = ? WHERE rollout_id = ?",
                            [(o.status, o.error_kind, o.error, o.rollout_id) for o in blamed])
        log.warning("epoch %s: %d rollouts ran while a service was down (seen after they were recorded): they are "
                    "our failure and run again", epoch, len(blamed))
    return len(blamed)


def _round_filter(sampling_round: int | None) -> tuple[str, list[int]]:
    """The SQL condition (and its argument) that keeps one sampling round's rollouts; none for every round."""
    return ("", []) if sampling_round is None else ("AND coalesce(sampling_round, 0) = ?", [sampling_round])


def check_collector(stack: Stack, *, wait_s: float = 0.0) -> None:
    """Raise ``ServiceError`` when the collector cannot store spans: it says so (its own reason and its log), or it
    does not answer for ``wait_s`` seconds (down, or the network to it cut: the supervisor restarts one this process
    started, and an outage shorter than that is waited out)."""
    from lightning_core.common.services import ServiceError, health

    deadline = time.monotonic() + wait_s
    while not (seen := health(stack.collector.health_url)).ok and not seen.answered and time.monotonic() < deadline:
        stack.raise_failure()  # ours died and could not be restarted: no use waiting
        time.sleep(1.0)
    if seen.ok:
        return
    where = f"; its log is {stack.collector.log_path}" if stack.collector.log_path else ""
    if seen.answered:
        raise ServiceError(
            f"the collector at {stack.collector.url} cannot store spans: {seen.reason}{where}. Spans it refuses are "
            "lost to training, so the run stopped instead of training on what is left: fix the lake (disk space, "
            "permissions, a folder that was removed) and run the same command again to resume")
    waited = f" for {wait_s:.0f} s" if wait_s else ""
    raise ServiceError(
        f"the collector at {stack.collector.url} did not answer{waited} ({seen.reason}){where}. The spans of the "
        "epoch's rollouts cannot reach the lake, so the run stopped instead of training on what arrived: start the "
        "collector again, or mend the network between it and this machine and the agents, then run the same command "
        "again to resume (the rollouts whose spans were lost run again)")


class RunStopped(RuntimeError):
    """A sampling round that failed too much to train on; the message says what failed and what to do."""


class RanBefore(RuntimeError):
    """A rollout batch that the engine started a second time after losing the worker that ran it (or the one that held
    its result): refused, since under the same attempt numbers its spans would mix with the first run's."""


def claim_name(key: Any) -> str:
    """The name of the Dask event that says the Dask task ``key`` (one rollout batch) has started."""
    return f"arclight-batch-started-{key}"


def refuse_a_second_run() -> None:
    """On a Dask worker, raise ``RanBefore`` when this task was started before; mark it started otherwise.

    Dask runs a task again on another worker when the one running it dies (``distributed.scheduler.allowed-failures``,
    a setting of the scheduler for every task), and recomputes a finished one whose result was lost with its worker,
    and it cannot be told not to for one task. Ray can (``max_retries=0``). The claims stay with the scheduler until the
    round's futures are released (``flows/runners.py``). Outside a Dask worker this does nothing."""
    try:
        from distributed import Event, get_worker
    except ImportError:
        return
    try:
        worker = get_worker()
    except ValueError:  # not on a Dask worker: the flow's threads, or Ray
        return
    key = worker.get_current_task()
    claim = Event(claim_name(key))
    if claim.is_set():
        raise RanBefore(f"Dask started rollout batch {key!r} again after losing the worker that ran it (or that held its "
                        "result); it runs again under new attempt numbers once the round's runs are in")
    claim.set()


def worker_lost(exc: BaseException) -> bool:
    """Whether a rollout batch's task failed because the engine lost its worker (its node died, its process was
    killed), not because the task raised: Ray's system errors, not a ``RayTaskError`` (the task's own exception); on
    Dask, a batch started again (``RanBefore``) or one whose workers kept dying (``KilledWorker``)."""
    if isinstance(exc, RanBefore):
        return True
    try:
        from distributed import KilledWorker
    except ImportError:
        pass
    else:
        if isinstance(exc, KilledWorker):
            return True
    try:
        from ray.exceptions import RayError, RayTaskError
    except ImportError:
        return False
    return isinstance(exc, RayError) and not isinstance(exc, RayTaskError)


def lost_with_their_worker(specs: list, *, first_attempts: dict[str, int], error: BaseException) -> list[RolloutOutcome]:
    """The outcomes of a batch of rollouts whose worker was lost (its node died, its process was killed): each an
    infrastructure failure, so that it runs again, with a new attempt number, once the round's runs are in (the engine
    itself does not run it again: Ray is told not to, and on Dask a second start is refused, ``refuse_a_second_run``;
    a re-run under the same attempt numbers would mix its spans with the lost run's)."""
    now = time.time()
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    why = f"the worker running it was lost: {type(error).__name__}: {lines[0] if lines else ''}"[:500]
    return [RolloutOutcome(spec.rollout_id, FAILED, first_attempts.get(spec.rollout_id, 0), None, why, now, now,
                           INFRASTRUCTURE) for spec in specs]


class TrainHostError(RuntimeError):
    """The training stage failed on a train host (``trainer.executor: ray``): a rank died or raised, the cluster has
    no node to train on, or the parent version could not be fetched; no version was made. The message says which."""


def retry_infrastructure_failures(ctx: RunContext, *, run_id: str, epoch: int, mode: str,
                                  sampling_round: int | None = None) -> list[str]:
    """Plan the rollouts of (run, epoch, mode) -- of one ``sampling_round`` when given: an earlier round's were
    retried by that round -- that our services failed to run again (status back to planned); return their ids. Their
    next attempt gets a new attempt number, so their earlier spans never mix in."""
    round_filter, args = _round_filter(sampling_round)
    where = (f"WHERE run_id = ? AND epoch = ? AND mode = ? AND status <> 'planned' AND error_kind = 'infrastructure' "
             f"{round_filter}")
    with ctx.catalog.write() as con:
        ids = [r for (r,) in con.execute(f"SELECT rollout_id FROM rollouts {where} ORDER BY rollout_id",
                                         [run_id, epoch, mode, *args]).fetchall()]
        if ids:
            con.execute(f"UPDATE rollouts SET status = 'planned', infra_failures = coalesce(infra_failures, 0) + 1 "
                        f"{where}", [run_id, epoch, mode, *args])
    return ids


def wait_for_services(stack: Stack, *, timeout_s: float) -> None:
    """Wait until every server of the stack answers (the supervisor restarts the dead ones); raise ``ServiceError``
    with the last reason after ``timeout_s``."""
    from lightning_core.common.services import ServiceError, health

    deadline = time.monotonic() + timeout_s
    while True:
        stack.raise_failure()  # one that cannot be restarted: no use waiting
        with stack.locked():  # not while the supervisor restarts one
            down = [(s, h) for s in stack.services() if not (h := health(s.health_url, timeout_s=5.0)).ok]
        if not down:
            return
        if time.monotonic() > deadline:
            service, seen = down[0]
            raise ServiceError(f"{service.name} at {service.url} is still down after {timeout_s:.0f} s: {seen.reason} "
                               f"(log {service.log_path or 'its own'})")
        time.sleep(1.0)


def record_incidents(ctx: RunContext, *, run_id: str, epoch: int) -> dict[str, Any]:
    """Store what our services did to the epoch (outages and restarts while it ran, rollouts run again, rollouts left
    out) in its ``incidents``; return it ({} when nothing happened)."""
    stack = ctx.services
    catalog = ctx.catalog
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


def check_round(ctx: RunContext, *, run_id: str, epoch: int, mode: str, sampling_round: int | None,
                logs: list[str]) -> dict[str, Any]:
    """Count the round's failures; raise ``RunStopped`` when at least ``rollouts.stop_at_failed_share`` of its
    rollouts failed or timed out (after retries): training on what is left, or drawing more tasks, would hide it."""
    config = ctx.config
    round_filter, round_args = _round_filter(sampling_round)
    args = [run_id, epoch, mode, *round_args]
    with ctx.catalog.read(spans=False) as con:
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
        again = _plan_failed_again(ctx, run_id=run_id, epoch=epoch, mode=mode, sampling_round=sampling_round)
        raise RunStopped(
            f"{n_failed} of {total} rollouts of {where} (run {run_id}) failed or timed out ({kinds}), at least "
            f"rollouts.stop_at_failed_share = {share:g} of them, so the run stopped instead of training on the rest or "
            f"drawing more tasks. Most common: {common}. Logs: {', '.join(logs) or 'none'}. Fix the cause and run the "
            f"same command again: completed stages are kept, and this round's {again} failed rollouts run again "
            "(each as a new attempt)")
    return result


def _plan_failed_again(ctx: RunContext, *, run_id: str, epoch: int, mode: str, sampling_round: int | None) -> int:
    """Plan the round's failed and timed-out rollouts again (the agent's own failures; ours are retried anyway), so
    that the same command, run once the cause is fixed, runs them instead of stopping on the same rows; return how
    many. Their next attempt gets a new number (``stages.first_attempts``), so the failed attempt's spans never mix in."""
    round_filter, args = _round_filter(sampling_round)
    where = (f"WHERE run_id = ? AND epoch = ? AND mode = ? AND status IN ('{FAILED}', '{TIMED_OUT}') "
             f"AND coalesce(error_kind, '') <> '{INFRASTRUCTURE}' {round_filter}")
    with ctx.catalog.write() as con:
        (count,) = con.execute(f"SELECT count(*) FROM rollouts {where}", [run_id, epoch, mode, *args]).fetchall()[0]
        con.execute(f"UPDATE rollouts SET status = 'planned' {where}", [run_id, epoch, mode, *args])
    return count
