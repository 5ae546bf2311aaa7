"""Where each call goes: rollout registrations and the policy table (SQLite, shared by a gateway's processes), the
version a client's model name resolves to, and the replica a rollout sticks to (rendezvous hashing)."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import os
import socket
import sqlite3
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

from opentelemetry.sdk.resources import Resource
from pydantic import BaseModel, ConfigDict, Field, field_validator

from lightning_core import names, semconv


log = logging.getLogger("arclight.gateway")


SERVICE_NAME = "arclight-gateway"


class GatewayError(Exception):
    """A request the gateway answers with an OpenAI-style error body."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


class ReplicaRefused(GatewayError):
    """A vLLM replica that refused the connection (down or restarting), as opposed to one that is slow or failing."""


class PinnedVersionGone(GatewayError):
    """A rollout's pinned version is no longer served (weights reloaded in place, or the adapter unloaded): its call
    cannot go to the version its rollout started on, and no other version may answer it. Our failure, not the
    agent's: the call is recorded as failed upstream and the rollout runs again (``target`` names the pin)."""

    def __init__(self, message: str, target: "Target"):
        super().__init__(503, message, "pinned_version_unavailable")
        self.target = target


class RolloutInfo(BaseModel):
    """A registered rollout: where its spans belong and which policy it samples from."""

    model_config = ConfigDict(extra="forbid")
    rollout_id: str
    run_id: str | None = None
    epoch: int | None = None
    task_id: str | None = Field(None, max_length=1024)
    attempt: int | None = None
    policy: str | None = Field(None, description="Policy every call of this rollout uses; default by model name.")
    seed: int | None = Field(
        None, ge=0, lt=2**63, description="Seeds the rollout's sampling: a call that names no seed of its own is sent to "
        "vLLM with one derived from this and the call's messages, so a run repeated with the same seeds samples the same "
        "completions (up to the engine's numerics). None = unseeded.")
    pins: dict[str, tuple[str, int]] | None = Field(
        None, description="Set by the gateway at registration: policy -> (served model, version) serving then. Every "
        "call of the rollout to a policy goes to its pinned version, so a redeploy during the rollout never switches "
        "it mid-way.")

    # these values name lake folders or BIGINT columns: one bad one would make the collector
    # refuse every export batch that carries it, with other rollouts' spans in it
    _rollout_id = field_validator("rollout_id", mode="before")(lambda v: names.check_rollout_id(v))
    _run_id = field_validator("run_id", mode="before")(lambda v: None if v is None else names.check_run_id(v))
    _epoch = field_validator("epoch", mode="before")(lambda v: None if v is None else names.check_epoch(v))
    _attempt = field_validator("attempt", mode="before")(lambda v: None if v is None else names.check_count(v, what="attempt"))


class PolicySwitch(BaseModel):
    """Make ``served_model`` (an adapter loaded on every replica) the current version of a policy."""

    model_config = ConfigDict(extra="forbid")
    served_model: str = Field(min_length=1)
    version: int = Field(ge=0)


@dataclass
class PolicyState:
    """A policy's current served model and the earlier versions still loaded (newest first)."""

    name: str
    served_model: str | None = None
    version: int = 0
    history: list[tuple[str, int]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """Return the state as JSON-ready data."""
        return {"name": self.name, "served_model": self.served_model, "version": self.version,
                "history": [{"served_model": m, "version": v} for m, v in self.history]}


@dataclass
class Target:
    """Where one call goes: the served model name, its policy and version, the replica, and the replicas to fail over to."""

    served_model: str
    policy: str | None
    version: int
    replica: str
    replicas: list[str] = field(default_factory=list)


class GatewayState:
    """Rollout registrations and the policy table in SQLite, shared by every gateway process that opens the same file.

    One process uses an in-memory database. Several processes behind one address (``gateway.workers``) open one
    file: a registration or a policy switch made through any of them is seen by all, since every call reads its
    rollout by primary key and reloads the (small) policy table whenever another process committed
    (``PRAGMA data_version``). Registrations live as long as the gateway; nothing here needs to survive it. So do the
    counts of a rollout's repeated calls (``count_call``), which go with its registration, and of the model-call spans
    recorded for it since it was registered (``count_recorded``), which forgetting it answers.
    """

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = str(path) if path else ":memory:"
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        if self.path != ":memory:":
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")  # WAL: no fsync per registration; the state dies with the gateway
        self.db.execute("CREATE TABLE IF NOT EXISTS rollouts (rollout_id TEXT PRIMARY KEY, info TEXT NOT NULL, "
                        "recorded INTEGER NOT NULL DEFAULT 0)")
        self.db.execute("CREATE TABLE IF NOT EXISTS policies (name TEXT PRIMARY KEY, served_model TEXT, "
                        "version INTEGER NOT NULL, history TEXT NOT NULL)")
        # flush requests reach every process: /admin/flush raises the generation, each process flushes and acks it
        self.db.execute("CREATE TABLE IF NOT EXISTS processes (instance TEXT PRIMARY KEY, flushed INTEGER NOT NULL, "
                        "seen REAL NOT NULL)")
        self.db.execute("CREATE TABLE IF NOT EXISTS flushes (id INTEGER PRIMARY KEY CHECK (id = 0), generation INTEGER)")
        self.db.execute("INSERT OR IGNORE INTO flushes VALUES (0, 0)")
        # how many times each rollout asked each call with its seed: every process counts in one place
        self.db.execute("CREATE TABLE IF NOT EXISTS calls (rollout_id TEXT NOT NULL, seed INTEGER NOT NULL, "
                        "call BLOB NOT NULL, asked INTEGER NOT NULL, PRIMARY KEY (rollout_id, seed, call)) WITHOUT ROWID")
        self._seen: dict[str, int] = {}

    def changed(self, reader: str = "policies") -> bool:
        """True when another connection committed since ``reader`` last asked."""
        version = self.db.execute("PRAGMA data_version").fetchone()[0]
        changed, self._seen[reader] = version != self._seen.get(reader), version
        return changed

    def flush_generation(self) -> int:
        return self.db.execute("SELECT generation FROM flushes").fetchone()[0]

    def request_flush(self) -> int:
        """Ask every process to flush; the generation they ack."""
        return self.db.execute("UPDATE flushes SET generation = generation + 1 RETURNING generation").fetchone()[0]

    def ack(self, instance: str, generation: int) -> None:
        """``instance`` is alive and has flushed up to ``generation``."""
        self.db.execute("INSERT INTO processes VALUES (?, ?, ?) ON CONFLICT (instance) DO UPDATE SET "
                        "flushed = max(flushed, excluded.flushed), seen = excluded.seen", (instance, generation, time.time()))

    def unflushed(self, generation: int, *, alive_s: float) -> list[str]:
        """The live processes (seen within ``alive_s``) that have not flushed ``generation`` yet."""
        return [r[0] for r in self.db.execute("SELECT instance FROM processes WHERE flushed < ? AND seen > ?",
                                              (generation, time.time() - alive_s)).fetchall()]

    def leave(self, instance: str) -> None:
        self.db.execute("DELETE FROM processes WHERE instance = ?", (instance,))

    def put_rollout(self, info: RolloutInfo) -> None:
        """Register a rollout (again: each attempt is registered), its count of recorded spans at 0."""
        self.db.execute("INSERT OR REPLACE INTO rollouts (rollout_id, info) VALUES (?, ?)",
                        (info.rollout_id, info.model_dump_json()))

    def get_rollout(self, rollout_id: str) -> str | None:
        row = self.db.execute("SELECT info FROM rollouts WHERE rollout_id = ?", (rollout_id,)).fetchone()
        return row[0] if row else None

    def delete_rollout(self, rollout_id: str) -> int | None:
        """Forget a rollout and the counts of its calls; return the model-call spans recorded for it since its
        registration, None when it was not registered."""
        self.db.execute("DELETE FROM calls WHERE rollout_id = ?", (rollout_id,))
        row = self.db.execute("DELETE FROM rollouts WHERE rollout_id = ? RETURNING recorded", (rollout_id,)).fetchone()
        return row[0] if row else None

    def count_recorded(self, rollout_id: str, spans: int) -> None:
        """``spans`` model-call spans were handed to the exporter for the rollout (none once it is forgotten)."""
        self.db.execute("UPDATE rollouts SET recorded = recorded + ? WHERE rollout_id = ?", (spans, rollout_id))

    def count_call(self, rollout_id: str, seed: int, call: bytes) -> int:
        """How many times the rollout asked ``call`` with ``seed`` before this ask (0 the first time), counted in one
        statement for every process of the gateway."""
        return self.db.execute("INSERT INTO calls VALUES (?, ?, ?, 0) ON CONFLICT DO UPDATE SET asked = asked + 1 "
                               "RETURNING asked", (rollout_id, seed, call)).fetchone()[0]

    def count_rollouts(self) -> int:
        return self.db.execute("SELECT count(*) FROM rollouts").fetchone()[0]

    def load_policies(self) -> dict[str, PolicyState]:
        rows = self.db.execute("SELECT name, served_model, version, history FROM policies").fetchall()
        return {name: PolicyState(name, model, version, [tuple(h) for h in json.loads(history)])
                for name, model, version, history in rows}

    @contextlib.contextmanager
    def policy_update(self) -> Iterator[dict[str, PolicyState]]:
        """Read, change and write the policy table as one transaction (two processes switching never interleave)."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            policies = self.load_policies()
            yield policies
            self.db.executemany("INSERT OR REPLACE INTO policies VALUES (?, ?, ?, ?)",
                                [(p.name, p.served_model, p.version, json.dumps(p.history)) for p in policies.values()])
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise


class Router:
    """Maps rollouts to replicas and client model names to the policy versions serving now.

    A rollout's replica is a pure function of its id and the upstream list (rendezvous hashing), so every gateway
    process, on any host, sends a rollout's calls to the same replica without asking the others; when a replica
    cannot be reached its rollouts move to their next replica in the same order. Registrations and the policy
    table live in a ``GatewayState`` (shared by the processes of one gateway).
    """

    DOWN_FOR_S = 5.0  # an unreachable replica is skipped this long before it is tried again

    def __init__(self, *, upstreams: list[str], base_model: str, policies: list[str], state: GatewayState | None = None):
        if not upstreams:
            raise ValueError("the gateway needs at least one vLLM upstream URL")
        # "NAME=URL" puts a replica in the group of the policy (or the base model) NAME: that target's calls go
        # only to its group (merged weights per policy, base weights for frozen agents); plain URLs serve the rest
        self.groups: dict[str | None, list[str]] = {}
        for spec in upstreams:
            group, url = spec.split("=", 1) if "=" in spec.split("://", 1)[0] else (None, spec)
            self.groups.setdefault(group, []).append(url.rstrip("/").removesuffix("/v1"))
        self.upstreams = [u for urls in self.groups.values() for u in urls]
        self.default_upstreams = self.groups.get(None) or self.upstreams
        self.base_model = base_model
        self.state = state or GatewayState()
        with self.state.policy_update() as table:
            for name in policies or ["default"]:
                table.setdefault(name, PolicyState(name))
        self.policies = table
        self.default_policy = (policies or ["default"])[0]
        self._resources: dict[str, tuple[str, RolloutInfo, Resource]] = {}
        self._down: dict[str, float] = {}
        self._round_robin = itertools.cycle(self.default_upstreams)
        self._calls = itertools.count()
        self.instance = f"{socket.gethostname()}:{os.getpid()}"
        self.production_resource = Resource.create({semconv.SERVICE_NAME: SERVICE_NAME, semconv.SERVICE_INSTANCE_ID: self.instance})

    def refresh(self) -> None:
        """Reload the policy table when another gateway process changed the shared state."""
        if self.state.changed():
            self.policies = self.state.load_policies()

    def replicas_for(self, rollout_id: str, upstreams: list[str] | None = None) -> list[str]:
        """The rollout's replicas (of ``upstreams``, default the ungrouped ones) in preference order: highest
        ``blake2b(replica, rollout id)`` first."""
        return sorted(upstreams or self.default_upstreams, reverse=True,
                      key=lambda u: hashlib.blake2b(f"{u}\0{rollout_id}".encode(), digest_size=8).digest())

    def group_upstreams(self, name: str | None) -> list[str]:
        """The replicas that serve policy (or base model) ``name``: its group, else the ungrouped ones."""
        return self.groups.get(name) or self.default_upstreams if name is not None else self.default_upstreams

    def _in_group(self, target: "Target", rollout: RolloutInfo | None) -> "Target":
        """``target`` sent to the replicas of its policy's group (the base model's for a call of the base model)."""
        group = target.policy if target.policy is not None else self.base_model
        if group not in self.groups:
            return target
        urls = self.groups[group]
        if rollout is not None:
            replicas = self.live(self.replicas_for(rollout.rollout_id, urls))
        else:  # production traffic: round robin over the group
            first = next(self._calls) % len(urls)
            replicas = self.live(urls[first:] + urls[:first])
        return Target(target.served_model, target.policy, target.version, replicas[0], replicas)

    def live(self, candidates: list[str]) -> list[str]:
        """``candidates`` with the replicas marked down moved to the end (they are still tried last)."""
        now = time.monotonic()
        down = [u for u in candidates if self._down.get(u, 0.0) > now]
        return [u for u in candidates if u not in down] + down

    def mark_down(self, replica: str) -> None:
        """Skip ``replica`` for ``DOWN_FOR_S`` (it refused a connection); its rollouts use their next replica."""
        if self._down.get(replica, 0.0) <= time.monotonic():
            log.warning("vLLM replica %s cannot be reached: its rollouts go to their next replica for %.0f s",
                        replica, self.DOWN_FOR_S)
        self._down[replica] = time.monotonic() + self.DOWN_FOR_S

    def register(self, info: RolloutInfo) -> str:
        """Register (or re-register) a rollout, pinned to the version its policy serves now; return the replica its
        calls will stick to."""
        self.refresh()
        if info.policy is not None and info.policy not in self.policies:
            raise GatewayError(400, f"policy {info.policy!r} is not served here; known policies: {sorted(self.policies)}")
        pins = {name: (state.served_model or self.base_model, state.version) for name, state in self.policies.items()}
        self.state.put_rollout(info.model_copy(update={"pins": pins}))
        return self.live(self.replicas_for(info.rollout_id))[0]

    def forget(self, rollout_id: str) -> int | None:
        """Forget a rollout; later calls with its id get 404 (from every process of the gateway). Return the model-call
        spans recorded for it since its registration, None when it was not registered."""
        self._resources.pop(rollout_id, None)
        return self.state.delete_rollout(rollout_id)

    def rollout(self, rollout_id: str) -> tuple[RolloutInfo, list[str], Resource]:
        """Return a registered rollout, its replicas in preference order and its span resource, or raise 404."""
        text = self.state.get_rollout(rollout_id)
        if text is None:
            self._resources.pop(rollout_id, None)
            raise GatewayError(404, f"rollout {rollout_id!r} is not registered: POST /admin/rollouts first "
                                    "(or use /v1/... for traffic outside rollouts)", "not_found_error")
        cached = self._resources.get(rollout_id)
        if cached is None or cached[0] != text:
            info = RolloutInfo.model_validate_json(text)
            attrs = {semconv.SERVICE_NAME: SERVICE_NAME, semconv.SERVICE_INSTANCE_ID: self.instance,
                     semconv.ROLLOUT_ID: info.rollout_id}
            for key, value in ((semconv.RUN_ID, info.run_id), (semconv.EPOCH, info.epoch),
                               (semconv.TASK_ID, info.task_id), (semconv.ATTEMPT, info.attempt)):
                if value is not None:
                    attrs[key] = value
            if len(self._resources) > 100_000:
                self._resources.clear()
            cached = self._resources[rollout_id] = (text, info, Resource.create(attrs))
        return cached[1], self.live(self.replicas_for(rollout_id)), cached[2]

    def resolve(self, requested: Any, rollout: RolloutInfo | None, replicas: list[str] | None) -> Target:
        """Pick the served model: an exact loaded version, the rollout's policy, a policy named by ``model``, or the default."""
        self.refresh()
        if not replicas:
            first = next(self._round_robin)
            replicas = self.live([first, *(u for u in self.upstreams if u != first)])
        if isinstance(requested, str):
            if requested == self.base_model:
                return self._in_group(Target(self.base_model, None, 0, replicas[0], replicas), rollout)
            for state in self.policies.values():
                if requested == state.served_model:
                    return self._in_group(Target(requested, state.name, state.version, replicas[0], replicas), rollout)
                for model, version in state.history:
                    if requested == model:
                        return self._in_group(Target(requested, state.name, version, replicas[0], replicas), rollout)
        name = (rollout.policy if rollout is not None and rollout.policy else None) \
            or (requested if requested in self.policies else self.default_policy)
        state = self.policies[name]
        if rollout is not None and rollout.pins and name in rollout.pins:
            return self._in_group(self._pinned(rollout, state, replicas), rollout)
        return self._in_group(Target(state.served_model or self.base_model, name, state.version, replicas[0], replicas), rollout)

    def _pinned(self, rollout: RolloutInfo, state: PolicyState, replicas: list[str]) -> Target:
        """The rollout's pinned version of ``state``'s policy while it is still loaded (serving, or kept for
        rollback); else ``PinnedVersionGone``."""
        pin = tuple(rollout.pins[state.name])
        target = Target(pin[0], state.name, pin[1], replicas[0], replicas)
        if pin == (state.served_model or self.base_model, state.version) or pin in state.history:
            return target
        if pin == (self.base_model, 0) and (state.served_model or self.base_model) != self.base_model:
            return target  # the base model stays loaded, unchanged, beside the adapters (merged weights replace it)
        raise PinnedVersionGone(
            f"rollout {rollout.rollout_id!r} started on version {pin[1]} of policy {state.name!r} ({pin[0]}), which is "
            f"no longer served (now version {state.version}, {state.served_model or self.base_model}): its calls must "
            "all go to one version, so this one fails on our side and the rollout runs again", target)

    def switch(self, policy: str, update: PolicySwitch, *, keep: int) -> PolicyState:
        """Make ``update`` the policy's current version; the old one becomes the first rollback."""
        with self.state.policy_update() as table:
            state = table.setdefault(policy, PolicyState(policy))
            if state.served_model is not None and state.served_model != update.served_model:
                state.history.insert(0, (state.served_model, state.version))
            state.history = [(m, v) for m, v in state.history if m != update.served_model][: max(keep - 1, 0)]
            state.served_model, state.version = update.served_model, update.version
        self.policies = table
        return state

    def rollback(self, policy: str) -> PolicyState:
        """Switch a policy back to its previous version (still loaded); 409 when there is none."""
        with self.state.policy_update() as table:
            state = table.get(policy)
            if state is None:
                raise GatewayError(404, f"policy {policy!r} is not served here", "not_found_error")
            if not state.history:
                raise GatewayError(409, f"policy {policy!r} has no earlier version loaded to roll back to", "conflict")
            model, version = state.history.pop(0)
            state.served_model, state.version = model, version
        self.policies = table
        return state
