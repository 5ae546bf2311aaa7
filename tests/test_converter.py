"""The collector's converter thread converts queued requests together, and a bad one never fails the others.

The converter writes through a real ``GroupCommitWriter`` into a real lake. To make requests queue
deterministically, the first request's hand-off to the writer waits until the test has queued the
rest: they are then converted as one batch.
"""

from __future__ import annotations

import concurrent.futures
import gzip
import json
import threading
import time

import pytest

from lightning_core.ingest import converter as converter_module
from lightning_core.store.catalog import Catalog
from lightning_core.ingest.converter import Converter
from lightning_core.ingest.group_commit import GroupCommitWriter
from lightning_core.store.spans import Lake
from lightning_core.ingest.otlp_decode import JSON, PROTOBUF, RequestRejected
from lightning_core.ingest.span_rows import SpanDataError
from tests.conftest import make_config
from tests.otlp_factory import export_request, otlp_json


class Held:
    """A converter whose first hand-off to the writer waits for ``release()``; records every hand-off."""

    def __init__(self, cfg, *, max_partitions: int = 64, flush_interval_s: float = 0):
        self.writer = GroupCommitWriter(Lake(cfg.lake.path), flush_interval_s=flush_interval_s)
        self.handed: list[int] = []  # rows per hand-off
        self._go, self._waiting = threading.Event(), threading.Event()
        self.converter = Converter(self._store, max_body_bytes=1 << 24, max_partitions=max_partitions)

    def _store(self, tables):
        if not self.handed:
            self._waiting.set()
            self._go.wait(30)
        self.handed.append(sum(t.num_rows for t in tables.values()))
        return self.writer.submit(tables)

    def submit(self, body: bytes, content_type: str = PROTOBUF, encoding: str = ""):
        return self.converter.submit(body, content_type, encoding, hold=lambda n: None)

    def hold_first(self, body: bytes):
        """Submit ``body`` and return once the converter waits to hand it to the writer."""
        future = self.submit(body)
        assert self._waiting.wait(30)
        return future

    def release(self):
        self._go.set()

    def close(self):
        self.converter.close()
        self.writer.close()


@pytest.fixture
def cfg(tmp_path):
    cfg = make_config(tmp_path)
    Catalog.from_config(cfg).ensure()
    return cfg


def _rows(cfg, run_id: str) -> list[tuple]:
    with Catalog.from_config(cfg).read() as con:
        return con.execute("SELECT span_id, name, attributes FROM spans_raw WHERE run_id = ? ORDER BY span_id",
                           [run_id]).fetchall()


def _body(run: str, spans: int | list = 3) -> bytes:
    return export_request({"arclight.run_id": run}, spans).SerializeToString()


def test_queued_requests_are_converted_together_and_stored_as_each_alone(cfg, tmp_path):
    held = Held(cfg)
    first = held.hold_first(_body("first"))
    bodies = {run: _body(run, n) for run, n in (("a", 2), ("b", 5), ("a2", 1))}
    gzipped = gzip.compress(_body("gz", 4))
    as_json = json.dumps(otlp_json(export_request({"arclight.run_id": "js"}, 2))).encode()
    futures = {run: held.submit(body) for run, body in bodies.items()}
    futures["gz"] = held.submit(gzipped, encoding="gzip")
    futures["js"] = held.submit(as_json, JSON)
    held.release()
    counts = {run: future.result(30)[0] for run, future in futures.items()}
    durable = {run: future.result(30)[1] for run, future in futures.items()}
    first.result(30)[1].result(30)
    for future in durable.values():
        future.result(30)
    held.close()
    assert counts == {"a": 2, "b": 5, "a2": 1, "gz": 4, "js": 2}
    # the four protobuf requests (the gzipped one too) went to the writer as one unit; JSON alone, first
    assert held.handed == [3, 2, 12]
    assert {run: future.result(0) for run, future in durable.items()} == {"a": 12, "b": 12, "a2": 12, "gz": 12, "js": 2}
    # stored as a converter that takes one request at a time stores them
    alone_cfg = make_config(tmp_path / "alone")
    Catalog.from_config(alone_cfg).ensure()
    alone = Held(alone_cfg)
    alone.release()  # and each request waits for its commit before the next is sent
    for body in bodies.values():
        alone.submit(body).result(30)[1].result(30)
    alone.close()
    for run in ("a", "b", "a2"):
        assert _rows(cfg, run) == _rows(alone_cfg, run) and len(_rows(cfg, run)) == counts[run]
    assert len(_rows(cfg, "gz")) == 4 and len(_rows(cfg, "js")) == 2


def test_a_bad_request_in_a_batch_gets_its_own_error_and_the_others_are_stored(cfg):
    held = Held(cfg)
    held.hold_first(_body("first"))
    good = {run: held.submit(_body(run)) for run in ("g1", "g2")}
    bad_span = held.submit(_body("bad", [{}, {"trace_id": b"\x01" * 15}]))
    truncated = _body("cut", 4)[:-7]  # alone it is malformed; joined to the next body it could parse as something else
    cut = held.submit(truncated)
    good["g3"] = held.submit(_body("g3"))
    held.release()
    for future in good.values():
        future.result(30)[1].result(30)
    with pytest.raises(SpanDataError, match="trace_id must be 16 bytes"):
        bad_span.result(30)
    with pytest.raises(RequestRejected, match="not a valid OTLP protobuf") as refused:
        cut.result(30)
    assert refused.value.status == 400
    held.close()
    assert [len(_rows(cfg, run)) for run in ("g1", "g2", "g3", "bad", "cut")] == [3, 3, 3, 0, 0]


def test_a_batch_over_the_partition_limit_is_stored_request_by_request(cfg):
    """The limit is per request: three requests of 2 partitions each share no commit limit of 2."""
    held = Held(cfg, max_partitions=2)
    held.hold_first(_body("first"))
    requests = []
    for i in range(3):
        request = export_request({"arclight.run_id": f"p{i}", "arclight.epoch": 0}, 2)
        more = export_request({"arclight.run_id": f"p{i}", "arclight.epoch": 1}, 1)
        request.resource_spans.extend(more.resource_spans)
        requests.append(held.submit(request.SerializeToString()))
    over = export_request({"arclight.run_id": "over", "arclight.epoch": 0}, 1)
    for epoch in (1, 2):
        over.resource_spans.extend(export_request({"arclight.run_id": "over", "arclight.epoch": epoch}, 1).resource_spans)
    too_many = held.submit(over.SerializeToString())
    held.release()
    assert [future.result(30)[0] for future in requests] == [3, 3, 3]
    for future in requests:
        future.result(30)[1].result(30)
    with pytest.raises(SpanDataError, match="3 lake partitions"):
        too_many.result(30)
    held.close()
    assert [len(_rows(cfg, f"p{i}")) for i in range(3)] == [3, 3, 3]


def test_a_request_cancelled_while_queued_is_dropped_and_the_converter_goes_on(cfg):
    """A handler that goes away before its request is converted (its await cancelled) leaves nothing behind."""
    held = Held(cfg)
    held.hold_first(_body("first"))
    g1, gone, g2 = held.submit(_body("g1")), held.submit(_body("gone")), held.submit(_body("g2"))
    assert gone.cancel()
    held.release()
    for future in (g1, g2):
        future.result(30)[1].result(30)
    later = held.submit(_body("later"))
    later.result(30)[1].result(30)
    held.close()
    assert held.handed == [3, 6, 3]
    assert [len(_rows(cfg, run)) for run in ("g1", "gone", "g2", "later")] == [3, 0, 3, 3]


def test_a_cancelled_wait_for_a_commit_does_not_cancel_the_other_requests_of_its_batch(cfg):
    """Requests converted together share a commit; each waits on a future of its own, so a client that goes
    away (its handler's await cancelled) takes no other request's answer with it."""
    held = Held(cfg, flush_interval_s=2)  # the commit waits: the cancel below comes well before it
    held.hold_first(_body("first"))
    a, b = held.submit(_body("a")), held.submit(_body("b"))
    held.release()
    (_, durable_a), (_, durable_b) = a.result(30), b.result(30)
    assert durable_a.cancel()
    assert durable_b.result(30) == 6
    held.close()
    assert [len(_rows(cfg, run)) for run in ("a", "b")] == [3, 3]  # a's spans were converted: they are stored


GUARD_S = 30  # the longest a step may take before the test calls it hung (a guard, not a measure)


class Handoffs:
    """A converter whose hand-offs to the writer are recorded and answered by futures the test completes; the
    next hand-off after ``gate()`` waits until the event it returns is set, so that requests queue behind it."""

    def __init__(self):
        self.commits: list[tuple[int, concurrent.futures.Future]] = []  # (rows, commit) per hand-off
        self._gate: threading.Event | None = None
        self._waiting = threading.Event()
        self.batches: list[int] = []  # requests per conversion, as the collector's metric is told
        self.converter = Converter(self._store, max_body_bytes=1 << 24, max_partitions=64, on_batch=self.batches.append)

    def _store(self, tables):
        if self._gate is not None:
            gate, self._gate = self._gate, None
            self._waiting.set()
            gate.wait(30)
        commit = concurrent.futures.Future()
        self.commits.append((sum(t.num_rows for t in tables.values()), commit))
        return commit

    def submit(self, body: bytes):
        return self.converter.submit(body, PROTOBUF, "", hold=lambda n: None)

    def gate(self) -> threading.Event:
        self._gate, self._waiting = threading.Event(), threading.Event()
        return self._gate

    def wait_gated(self) -> bool:
        """Whether the gated hand-off was reached (``GUARD_S`` guards against a hang)."""
        return self._waiting.wait(GUARD_S)

    def rows(self) -> list[int]:
        return [rows for rows, _ in self.commits]


def test_a_lone_request_waits_for_a_partner_only_after_a_joined_batch_and_while_a_commit_is_under_way(monkeypatch):
    """With four senders the requests travel in pairs (one pair converting while the other commits): after a batch
    of several requests, a request that finds the queue empty while a commit is under way waits up to
    ``JOIN_WAIT_S`` for a second one. After a batch of one (one or two senders: one request converts while the
    other commits), or while nothing is being committed, a request is converted at once."""
    # a wait never ends by itself here, so a request converted without a partner was converted at once, however
    # slow the machine (the GUARD_S timeouts only stop a wrong wait from hanging the test)
    monkeypatch.setattr(converter_module, "JOIN_WAIT_S", 3600.0)
    handoffs = Handoffs()
    try:
        assert handoffs.submit(_body("alone", 2)).result(GUARD_S)[0] == 2  # nothing committing: at once
        assert handoffs.submit(_body("single", 3)).result(GUARD_S)[0] == 3  # the last batch held one: at once
        gate = handoffs.gate()
        gated = handoffs.submit(_body("gated", 1))
        assert handoffs.wait_gated()
        pair = [handoffs.submit(_body(run, 2)) for run in ("p1", "p2")]  # queue behind the gated hand-off ...
        gate.set()
        assert gated.result(GUARD_S)[0] == 1 and [f.result(GUARD_S)[0] for f in pair] == [2, 2]
        assert handoffs.rows() == [2, 3, 1, 4]  # ... and are converted as one batch
        first = handoffs.submit(_body("first", 3))  # after a batch of two, with commits under way: waits ...
        time.sleep(0.3)
        assert len(handoffs.commits) == 4 and not first.done()
        second = handoffs.submit(_body("second", 4))  # ... for a partner
        assert first.result(GUARD_S)[0] == 3 and second.result(GUARD_S)[0] == 4
        assert handoffs.rows() == [2, 3, 1, 4, 7]
        for _, commit in handoffs.commits:
            commit.set_result(0)
        assert handoffs.submit(_body("again", 1)).result(GUARD_S)[0] == 1  # every commit done: at once
        assert handoffs.rows() == [2, 3, 1, 4, 7, 1]
        assert handoffs.batches == [1, 1, 1, 2, 2, 1]
    finally:
        for _, commit in handoffs.commits:
            if not commit.done():
                commit.set_result(0)
        handoffs.converter.close()
