"""An epoch's rollouts as MLflow traces: the repaired tree training used, with rewards, advantages and versions.

Each rollout (``pipeline/traces.py``) becomes one trace in the project's experiment, linked to the MLflow run of
the policy it trained (``tracking.start_run``): the spans with their inputs and outputs (an LLM span shows the
prompt messages and the answer, its token counts, the version that sampled it and the triplet it became: advantage,
return, whether a policy's ``agent_match`` selected it), the rollout's reward as feedback, and tags for run, epoch,
task, group, attempt, versions, agents, status and whose failure it was. MLflow's trace UI shows them (``mlflow
ui``); ``mlflow.search_traces`` reads them back.

Publishing is bounded and stoppable, and never fails an epoch: its work runs in a thread of its own, and
``publish_epoch`` returns when that is done, when ``tracking.traces_timeout_s`` has passed, or within a quarter second
of a stop (``common/stopping.py``: Ctrl-C), whichever comes first -- whatever the slow part is (the SQL that rebuilds
the trees, reading what MLflow has, MLflow's SQLite file locked by another writer). The thread then starts no other
trace (the one it is making is finished, or left without its published tag and made again next time). An error there (MLflow's ``database is locked`` among them) is the report's ``error``, a line in the epoch's
summary. It reports what it did and what it left. It is idempotent within a lake: a trace this lake (its
``arclight.lake`` tag, ``Catalog.lake_id``) already published for the same rollout attempt is kept, one cut off half-way
(no ``arclight.published`` tag) is deleted and made again; another lake's traces of the same run, epoch and rollout
ids (the lake made again after ``rm -rf .arclight``, another user of one tracking server) are left alone.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from lightning_core import tracking
from lightning_core.common import stopping
from lightning_core.config import ArclightConfig
from lightning_core.pipeline.traces import RolloutTrace, rollout_traces
from lightning_core.store.catalog import Catalog

log = logging.getLogger("arclight.traces")

PUBLISHED = "arclight.published"  # set last on a trace: one without it was cut off half-way
SOURCE_ID = "arclight"  # the source of the reward feedback
POLL_S = 0.25  # how often the caller looks at the stop flag while the publishing thread works
WRITING = "writing traces"


@dataclass
class Publication:
    """What publishing one (run, epoch)'s traces did."""

    run_id: str | None
    epoch: int | None
    mode: str
    rollouts: int = 0  # rollouts in the epoch
    chosen: int = 0  # of them, the ones ``tracking.traces`` keeps
    published: int = 0  # made now
    already: int = 0  # published before (a resumed epoch, or a second ``arclight traces``)
    replaced: int = 0  # cut off half-way before: deleted and made again
    left: int = 0  # chosen but not published: the time budget ran out
    counted: bool = False  # the trees were rebuilt: rollouts and chosen are the epoch's (a cut before leaves them 0)
    seconds: float = 0.0
    error: str | None = None  # why publishing stopped, when it failed
    trace_ids: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line for the epoch's log and summary."""
        scope = "production traces" if self.run_id is None else f"epoch {self.epoch} of {self.run_id}"
        chosen = (f"{self.chosen} of {self.rollouts} rollouts chosen by tracking.traces={self.mode}"
                  if self.counted or not self.error
                  else "stopped before its rollouts were counted: every one is left for `arclight traces`")
        text = (f"traces of {scope}: {self.published} published, {self.already} already there"
                f"{f', {self.replaced} cut off before and made again' if self.replaced else ''}"
                f" ({chosen}, {self.seconds:.1f} s)")
        if self.left:
            text += f"; {self.left} left: the {self.mode} budget of tracking.traces_timeout_s ran out"
        if self.error:
            text += f"; stopped: {self.error}"
        return text


def choose(traces: list[RolloutTrace], *, mode: str, cap: int) -> list[RolloutTrace]:
    """The traces ``mode`` keeps: ``all``; ``sample``: every failed rollout, then each group's best and worst, up to
    ``cap``; ``off``: none."""
    if mode == "off":
        return []
    if mode == "all":
        return list(traces)
    failed = [t for t in traces if t.failed]
    groups: dict[Any, list[RolloutTrace]] = {}
    for t in traces:
        if not t.failed:
            groups.setdefault(t.row["group_id"] or t.rollout_id, []).append(t)
    ends: list[RolloutTrace] = []
    for members in groups.values():
        scored = sorted(members, key=lambda t: (t.reward is None, -(t.reward or 0.0), t.rollout_id))
        ends += [scored[0]] + ([scored[-1]] if len(scored) > 1 else [])
    chosen = (failed + ends)[:cap]
    order = {id(t): i for i, t in enumerate(traces)}
    return sorted(chosen, key=lambda t: order[id(t)])


def publish_epoch(config: ArclightConfig, *, run_id: str | None, epoch: int | None, mode: str = "train",
                  catalog: Catalog | None = None, label: str | None = None) -> Publication:
    """Publish the rollouts of ``run_id``/``epoch`` (production traces when ``run_id`` is None) as MLflow traces.

    Returns when done, when ``tracking.traces_timeout_s`` has passed, or within ``POLL_S`` of a stop, whichever is
    first. Never raises for MLflow's sake: a failure is the ``error`` of the returned report.
    """
    settings = config.tracking
    report = Publication(run_id=run_id, epoch=epoch, mode=settings.traces)
    if settings.traces == "off":
        return report
    started = time.monotonic()
    work = _Work(deadline=started + settings.traces_timeout_s)
    worker = threading.Thread(target=_run, name=f"publish-traces-{run_id}-{epoch}", daemon=True,
                              kwargs={"config": config, "report": report, "work": work, "mode": mode,
                                      "catalog": catalog, "label": label})
    worker.start()
    why = None
    try:
        while worker.is_alive():
            worker.join(timeout=max(0.0, min(POLL_S, work.deadline - time.monotonic())))
            if not worker.is_alive():
                break
            if stopping.rollouts_end():
                why = "a stop was asked for"
                break
            if time.monotonic() >= work.deadline:
                why = f"tracking.traces_timeout_s ({settings.traces_timeout_s:g} s) ran out"
                break
    finally:
        work.cancel.set()  # the thread starts nothing more (on a KeyboardInterrupt here too)
    with work.lock:
        result = dataclasses.replace(report, trace_ids=list(report.trace_ids))
        phase = work.phase
    if why is not None:  # cut off: what it did not get to is left for `arclight traces`
        result.left = max(0, result.chosen - result.already - result.published)
        if phase != WRITING or why.startswith("a stop"):
            result.error = f"{why} while {phase}"
    if result.error:
        log.warning("publishing the traces of %s stopped: %s", run_id, result.error)
    result.seconds = round(time.monotonic() - started, 3)
    return result


class _Cut(Exception):
    """The caller has stopped waiting: publish nothing more."""


@dataclass
class _Work:
    """What the publishing thread and its caller share: the deadline, the caller's word to stop, the phase."""

    deadline: float
    cancel: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)  # held while the thread changes the report
    phase: str = "starting"

    def at(self, phase: str) -> None:
        """Enter ``phase`` (named in the report when it is cut off there), unless the caller has stopped waiting."""
        self.check()
        self.phase = phase

    def check(self) -> None:
        if self.cancel.is_set():
            raise _Cut


def _run(config: ArclightConfig, *, report: Publication, work: _Work, mode: str, catalog: Catalog | None,
         label: str | None) -> None:
    """The publishing thread: rebuild the trees, choose, publish; an error becomes the report's."""
    try:
        work.at("rebuilding the rollouts' trees from the lake")
        lake = (catalog or Catalog.from_config(config)).lake_id()
        traces = rollout_traces(config, run_id=report.run_id, epoch=report.epoch, catalog=catalog)
        chosen = choose(traces, mode=config.tracking.traces, cap=config.tracking.traces_cap)
        with work.lock:
            report.rollouts, report.chosen, report.counted = len(traces), len(chosen), True
        _publish(config, chosen, report=report, mode=mode, label=label, work=work, lake=lake)
    except _Cut:
        pass
    except Exception as exc:  # noqa: BLE001 - a trace that cannot be published never fails the epoch
        log.debug("publishing failed", exc_info=True)
        error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
        if work.cancel.is_set():  # the caller has reported it cut off already
            log.info("publishing the traces of %s, cut off before, then failed: %s", report.run_id, error)
            return
        with work.lock:
            report.error = error


def _publish(config: ArclightConfig, traces: list[RolloutTrace], *, report: Publication, mode: str,
             label: str | None, work: _Work, lake: str) -> None:
    # traces stored as they end, not by a queue of MLflow's own: a trace is complete when its tag is set here, and a
    # process that exits leaves at most one half-sent (without the tag: made again next time)
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_TRACE_LOGGING", "false")
    import mlflow
    from mlflow import MlflowClient

    work.at("reading the traces already in MLflow")
    experiment = tracking.experiment_id(config)
    client = MlflowClient()
    existing = _existing(client, experiment, run_id=report.run_id, epoch=report.epoch, lake=lake, work=work)
    run = (report.run_id or "").removesuffix(".eval")
    runs = tracking.runs_of(config, run_id=run, lake=lake) if report.run_id else []
    stale, todo = [], []
    for trace in traces:
        done = existing.get(_key(trace))
        if done is not None and done[1]:
            with work.lock:
                report.already += 1
            continue
        if done is not None:
            stale.append(done[0])
        todo.append(trace)
    if stale:  # cut off half-way (no published tag): made again below
        work.at("deleting the traces cut off half-way before")
        client.delete_traces(experiment, trace_ids=stale)
        report.replaced = len(stale)
    work.at(WRITING)
    for trace in todo:
        if time.monotonic() > work.deadline:
            with work.lock:
                report.left += 1
            continue
        work.check()
        trace_id = _write(client, experiment, trace, runs=runs, mode=mode, label=label, lake=lake)
        mlflow.flush_trace_async_logging()  # feedback, links and tags need the trace stored
        for other in runs[1:]:  # the other policies' runs: their versions trained on these rollouts too
            client.link_traces_to_run([trace_id], run_id=other)
        _finish(client, trace_id, trace)
        with work.lock:
            report.trace_ids.append(trace_id)
            report.published += 1


def _key(trace: RolloutTrace) -> tuple[str, str]:
    """What makes a trace the same one: its rollout and attempt (a production trace has no attempt)."""
    attempt = trace.row["attempt"]
    return trace.rollout_id, "" if attempt is None else str(attempt)


def _existing(client, experiment: str, *, run_id: str | None, epoch: int | None, lake: str,
              work: _Work) -> dict[tuple[str, str], tuple[str, bool]]:
    """This lake's traces of this (run, epoch) already in the experiment: (rollout, attempt) -> (trace id, complete)."""
    scope = [f"tag.`arclight.run_id` = '{run_id or '(production)'}'", f"tag.`{tracking.LAKE}` = '{lake}'"]
    if epoch is not None:
        scope.append(f"tag.`arclight.epoch` = '{epoch}'")
    found: dict[tuple[str, str], tuple[str, bool]] = {}
    token = None
    while True:
        work.check()
        page = client.search_traces(locations=[experiment], filter_string=" AND ".join(scope), max_results=500,
                                    page_token=token, include_spans=False)
        for t in page:
            tags = t.info.tags
            key = (tags.get("arclight.rollout_id"), tags.get("arclight.attempt", ""))
            complete = tags.get(PUBLISHED) == "true"
            if key not in found or complete:
                found[key] = (t.info.trace_id, complete)
        token = page.token
        if not token:
            return found


def _tags(trace: RolloutTrace, *, mode: str, label: str | None, lake: str) -> dict[str, str]:
    row = trace.row
    tags = {tracking.LAKE: lake, "arclight.run_id": trace.run_id or "(production)",
            "arclight.rollout_id": trace.rollout_id,
            "arclight.task_id": row["task_id"], "arclight.group_id": row["group_id"], "arclight.attempt": row["attempt"],
            "arclight.mode": row["mode"] or mode, "arclight.status": row["status"],
            "arclight.failure": row["error_kind"], "arclight.policy_version": ",".join(row["versions"]) or None,
            "arclight.agents": ",".join(row["agents"]) or None, "arclight.flags": ",".join(row["flags"]) or None,
            "arclight.reward": row["reward"], "arclight.eval_label": label}
    if trace.epoch is not None:
        tags["arclight.epoch"] = trace.epoch
    return {k: str(v) for k, v in tags.items() if v is not None}


def _write(client, experiment: str, trace: RolloutTrace, *, runs: list[str], mode: str, label: str | None,
           lake: str) -> str:
    """Make one trace: its root (the rollout's one root span, or a rollout span over several) and its spans."""
    from mlflow.entities import SpanStatusCode
    from mlflow.entities.span_status import SpanStatus

    row, spans = trace.row, trace.spans
    roots = [s for s in spans if s.parent is None]
    inputs = {"task": row["task"]} if row["task"] is not None else {"task_id": row["task_id"]}
    outputs = {"reward": row["reward"], "status": row["status"], **({"error": row["error"]} if row["error"] else {})}
    start = min([row["start_ns"] or 0, *[s.start_ns for s in spans]] if spans else [row["start_ns"] or time.time_ns()])
    end = max([row["end_ns"] or start, *[s.end_ns for s in spans]])
    name = f"rollout {row['task_id']}"
    single = roots[0] if len(roots) == 1 else None
    root = client.start_trace(name=name, span_type=single.kind if single else "CHAIN", inputs=inputs,
                              attributes=single.attributes if single else {},
                              tags=_tags(trace, mode=mode, label=label, lake=lake),
                              experiment_id=experiment, start_time_ns=start, run_id=runs[0] if runs else None)
    trace_id = root.trace_id
    made = {single.node: root.span_id} if single else {}
    for s in spans:
        if s is single:
            continue
        parent = made.get(s.parent, root.span_id)
        live = client.start_span(s.name, trace_id=trace_id, parent_id=parent, span_type=s.kind, inputs=s.inputs,
                                 attributes=s.attributes, start_time_ns=s.start_ns)
        made[s.node] = live.span_id
    for s in reversed(spans):  # children end before their parents
        if s is single:
            continue
        status = SpanStatus(SpanStatusCode.ERROR, s.error) if s.error is not None else "OK"
        client.end_span(trace_id, made[s.node], outputs=s.outputs, status=status, end_time_ns=s.end_ns)
    failed = row["status"] not in ("succeeded",) and row["mode"] is not None
    client.end_trace(trace_id, outputs=outputs, end_time_ns=end,
                     status=SpanStatus(SpanStatusCode.ERROR, row["error"] or row["status"]) if failed else "OK")
    return trace_id


def _finish(client, trace_id: str, trace: RolloutTrace) -> None:
    """The stored trace's feedback (the rollout's reward), its links to the other policies' runs, and the tag that
    says it is complete."""
    import mlflow
    from mlflow.entities import AssessmentSource

    row = trace.row
    if row["reward"] is not None:
        mlflow.log_feedback(trace_id=trace_id, name="reward", value=float(row["reward"]),
                            source=AssessmentSource(source_type="CODE", source_id=SOURCE_ID),
                            rationale=f"the rollout's final reward ({row['status']})")
    client.set_trace_tag(trace_id, PUBLISHED, "true")
