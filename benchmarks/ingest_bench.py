"""Durable ingest: pre-encoded OTLP requests into a real collector, against protobuf decode alone.

    .venv/bin/python benchmarks/ingest_bench.py --requests 40 --senders 4 [--workers 2] [--cache /tmp/ingest-requests]

Each request holds ~1,050 spans and ~1 MB (a third of them LLM spans with 240 prompt/response token
ids, as the gateway sends them; the rest carry a few string attributes). The requests are encoded
before the clock starts. ``--senders`` processes post them to one collector (its own temporary
lake) as fast as it answers; a 200 means the spans are durable in the lake. Printed: acknowledged
spans/s, the acknowledgement latency (p50, p99), and -- in the same run, in a fresh process that
holds only the requests it decodes -- how fast protobuf alone decodes the same requests
(``ExportTraceServiceRequest.FromString``), as the ratio the issue asks for; and the CPU time the
collector's processes spent per request (from ``/proc``: steadier than spans/s on a shared machine,
and what sets the rate once the cores are busy), and how many conversions there were and how many
took a request alone (the collector's ``arclight_collector_requests_per_conversion``). The lake is counted at
the end (a lost span fails the run). The clock starts once every sender process is up and connected.
``--rounds K`` sends the requests K times (a sustained run: the same spans are stored again) and
also prints the latency of the first and the last fifth, the compactions and the files left.

    .venv/bin/python benchmarks/ingest_bench.py --requests 10 --convert-only

times only the conversion of a request into span tables in this process: the upb parse and check of
the whole request, the per-span Python path (``span_rows.request_to_rows``), and what the collector does:
the outline parse (``otlp_decode.parse_outline``) and the columnar path (``otlp_columns``), also for
2 and 4 requests joined (``columnar x2``, ``columnar x4``, per request).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest  # noqa: E402

from benchmarks.proc_cpu import group_cpu_s  # noqa: E402
from lightning_core.config import load_config  # noqa: E402
from lightning_core.store.spans import snapshot  # noqa: E402
from lightning_core.common.services import free_port
from lightning_core.ingest.service import start_collector  # noqa: E402


def build_request(index: int, *, spans: int = 1050, run_id: str = "ingest") -> bytes:
    """One export request of ``spans`` spans, ~1 MB, with ids unique per ``index``."""
    request = ExportTraceServiceRequest()
    rs = request.resource_spans.add()
    for key, value in (("service.name", "bench-agent"), ("arclight.run_id", run_id)):
        kv = rs.resource.attributes.add()
        kv.key, kv.value.string_value = key, value
    kv = rs.resource.attributes.add()
    kv.key, kv.value.int_value = "arclight.epoch", 0
    scope = rs.scope_spans.add()
    scope.scope.name = "bench"
    for i in range(spans):
        n = index * spans + i + 1
        span = scope.spans.add()
        span.trace_id = (index + 1).to_bytes(16, "big")
        span.span_id = n.to_bytes(8, "big")
        span.name = "chat" if i % 3 == 0 else f"tool-{i % 7}"
        span.start_time_unix_nano = 1_700_000_000_000_000_000 + n * 1000
        span.end_time_unix_nano = span.start_time_unix_nano + 500
        attrs = {"arclight.rollout_id": f"ro-{index}-{i // 30}", "arclight.task_id": f"t-{i // 240}",
                 "agent.name": "writer", "arclight.span.kind": "llm" if i % 3 == 0 else "tool"}
        for key, value in attrs.items():
            kv = span.attributes.add()
            kv.key, kv.value.string_value = key, value
        if i % 3 == 0:  # the gateway's arrays
            for key, count in (("arclight.llm.prompt_token_ids", 200), ("arclight.llm.response_token_ids", 40)):
                kv = span.attributes.add()
                kv.key = key
                kv.value.array_value.values.extend([type(kv.value)(int_value=(n + j) % 49152) for j in range(count)])
            kv = span.attributes.add()
            kv.key = "arclight.llm.response_logprobs"
            kv.value.array_value.values.extend([type(kv.value)(double_value=-0.01 * j) for j in range(40)])
        else:
            kv = span.attributes.add()
            kv.key, kv.value.string_value = "tool.output", "x" * 120
    return request.SerializeToString()


def requests(count: int, spans: int, cache: Path | None) -> list[bytes]:
    """``count`` encoded requests, from ``cache`` when it holds them (a length-prefixed file per shape)."""
    path = cache / f"ingest-{count}x{spans}.bin" if cache is not None else None
    if path is not None and path.exists():
        data, bodies, at = path.read_bytes(), [], 0
        while at < len(data):
            size = int.from_bytes(data[at : at + 8], "little")
            bodies.append(data[at + 8 : at + 8 + size])
            at += 8 + size
        return bodies
    bodies = [build_request(i, spans=spans) for i in range(count)]
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"".join(len(b).to_bytes(8, "little") + b for b in bodies))
    return bodies


def decode_rate(bodies: list[bytes], repeat: int = 5) -> float:
    """Spans/s of protobuf decode alone (``FromString``, upb in C), best of ``repeat``, in a fresh process that
    holds only ``bodies``. (In the process that has loaded all the requests, ~800 MB for ``--requests 800``,
    the same decode measured 235-292k spans/s against 494-536k in a fresh one: glibc hands upb's arenas
    pages that must be faulted in again. That made the ratio look 1.8x better than it was.)"""
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(_decode_rate, (bodies, repeat))


def _decode_rate(bodies: list[bytes], repeat: int) -> float:
    best = 0.0
    for _ in range(repeat):
        started, spans = time.perf_counter(), 0
        for body in bodies:
            request = ExportTraceServiceRequest.FromString(body)
            spans += sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
        best = max(best, spans / (time.perf_counter() - started))
    return best


def convert_times(bodies: list[bytes], repeat: int = 3) -> dict[str, float]:
    """Milliseconds per request to turn the requests into span tables, in this process (best of ``repeat``):
    upb parse of the whole request and wire-type check, the per-span Python path (from that parse), the
    outline parse the collector does (``parse_outline``), the columnar path from the outline, and the
    columnar path of 2 and 4 requests joined into one body (as the converter thread joins queued ones)."""
    from lightning_core.ingest import otlp_columns, span_rows
    from lightning_core.ingest.otlp_decode import PROTOBUF, outline_unchecked, parse, parse_outline

    requests = [parse(body, PROTOBUF) for body in bodies]
    outlines = {id(request): parse_outline(body) for request, body in zip(requests, bodies)}
    paths = {
        "parse": lambda request, body: parse(body, PROTOBUF),
        "python": lambda request, body: [span_rows.rows_to_table(rows) for rows in span_rows.request_to_rows(request).values()],
        "outline": lambda request, body: parse_outline(body),
        "columnar": lambda request, body: otlp_columns.request_to_tables(outlines[id(request)], body, 0),
    }
    best = {}
    for name, convert in paths.items():
        for _ in range(repeat):
            started = time.perf_counter()
            for request, body in zip(requests, bodies):
                convert(request, body)
            took = (time.perf_counter() - started) / len(bodies) * 1000
            best[name] = min(best.get(name, took), took)
    for k in (2, 4):  # the collector's converter joins the requests that queue together (per request)
        joined = [b"".join(bodies[i : i + k]) for i in range(0, len(bodies) - k + 1, k)]
        for _ in range(repeat):
            started = time.perf_counter()
            for body in joined:
                otlp_columns.request_to_tables(outline_unchecked(body), body, 0)
            took = (time.perf_counter() - started) / (len(joined) * k) * 1000
            best[f"columnar x{k}"] = min(best.get(f"columnar x{k}", took), took)
    return best


def send(url: str, bodies: list[bytes], rounds: int, queue, ready, go) -> None:
    """Post ``bodies`` ``rounds`` times, one at a time; put (finished at, latency) per request on ``queue``."""
    import httpx

    latencies = []
    with httpx.Client(timeout=120) as client:
        client.get(f"{url}/healthz")  # connected before the clock starts
        ready.put(True)
        go.wait()
        for body in bodies * rounds:
            t = time.perf_counter()
            status = client.post(f"{url}/v1/traces", content=body, headers={"Content-Type": "application/x-protobuf"}).status_code
            if status != 200:
                raise SystemExit(f"collector answered {status}")
            now = time.perf_counter()
            latencies.append((now, now - t))
    queue.put(latencies)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=40, help="requests in all (shared by the senders)")
    parser.add_argument("--senders", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=1,
                        help="send the requests this many times (a sustained run: the same spans are stored again)")
    parser.add_argument("--spans", type=int, default=1050, help="spans per request")
    parser.add_argument("--workers", type=int, default=1, help="collector processes on the one port (collector.workers)")
    parser.add_argument("--convert-only", action="store_true", help="only time the conversion of the requests, in this process")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more config overrides (collector.flush_interval_ms=5)")
    parser.add_argument("--keep-lake", action="store_true", help="keep the lake the collector wrote (default: deleted at the end)")
    parser.add_argument("--cache", type=Path, metavar="DIR",
                        help="keep the encoded requests in DIR and reuse them (encoding 3,000 takes minutes)")
    args = parser.parse_args()
    bodies = requests(args.requests, args.spans, args.cache)
    print(f"{args.requests} requests of {args.spans} spans, {sum(map(len, bodies)) / len(bodies) / 1e6:.2f} MB each")
    if args.convert_only:
        times = convert_times(bodies[: min(10, len(bodies))])
        uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
        print("ms per request: " + ", ".join(f"{name} {ms:.2f}" for name, ms in times.items()) + f"; {uptime}")
        return
    decode = decode_rate(bodies[: min(8, len(bodies))])
    root = Path(tempfile.mkdtemp(prefix="arclight-ingest-"))
    try:
        run(args, bodies, decode, root)
    finally:
        if args.keep_lake:
            print(f"the lake is kept at {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def run(args, bodies: list[bytes], decode: float, root: Path) -> None:
    """Post the requests to a collector on a new lake under ``root``, count the lake, print the result."""
    cfg = load_config(None, overrides=[f"project_dir={root}", f"collector.port={free_port()}",
                                       "collector.compact_idle_s=3600", f"collector.workers={args.workers}", *args.set])
    service = start_collector(cfg, timeout_s=60)
    try:
        ctx = mp.get_context("spawn")
        queue, ready, go = ctx.Queue(), ctx.Queue(), ctx.Event()
        shares = [bodies[i:: args.senders] for i in range(args.senders)]
        procs = [ctx.Process(target=send, args=(service.url, share, args.rounds, queue, ready, go)) for share in shares]
        for p in procs:
            p.start()
        for _ in procs:  # the senders' start-up (a new interpreter each) is not the collector's time
            ready.get()
        pgid = os.getpgid(service.process.pid)
        cpu_before = group_cpu_s(pgid)
        started = time.perf_counter()
        go.set()
        finished = sorted(x for _ in procs for x in queue.get())
        elapsed = time.perf_counter() - started
        cpu = group_cpu_s(pgid) - cpu_before
        for p in procs:
            p.join()
        metrics = _metrics(service.url)
        compactions = _sample(metrics, "arclight_collector_compactions_total")
        conversions = _sample(metrics, "arclight_collector_requests_per_conversion_count")
        alone = _sample(metrics, "arclight_collector_requests_per_conversion_bucket", le="1.0")
    finally:
        service.stop()
    latencies = sorted(latency for _, latency in finished)
    spans = args.requests * args.spans * args.rounds
    from lightning_core.store.catalog import Catalog

    with Catalog.from_config(cfg).read() as con:  # spans_raw: every stored row
        stored = con.execute("SELECT count(*) FROM spans_raw WHERE run_id = 'ingest'").fetchall()[0][0]
    if stored != spans:
        raise SystemExit(f"{spans} spans acknowledged, {stored} stored")
    rate = spans / elapsed
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"acknowledged {spans:,} spans in {elapsed:.2f}s = {rate:,.0f} spans/s with {args.senders} senders, {args.workers} collector process(es); "
          f"ack latency p50 {latencies[len(latencies) // 2]:.3f}s p99 {latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]:.3f}s; "
          f"protobuf decode alone {decode:,.0f} spans/s (ratio {rate / decode:.3f}); "
          f"collector CPU {cpu * 1e3 / (args.requests * args.rounds):.1f} ms a request ({cpu / elapsed:.2f} cores); "
          f"{conversions:.0f} conversions, {alone:.0f} of one request{' (the process that answered /metrics)' if args.workers > 1 else ''}; "
          f"{uptime}")
    if args.rounds > 1:  # does a sustained run slow down as the table grows?
        fifth = max(1, len(finished) // 5)
        first, last = (sorted(latency for _, latency in part) for part in (finished[:fifth], finished[-fifth:]))
        files = len(snapshot(cfg.lake.path).files["training"])
        print(f"{args.rounds} rounds: ack p50 of the first fifth {first[len(first) // 2]:.3f}s, of the last fifth "
              f"{last[len(last) // 2]:.3f}s; {compactions:.0f} compaction(s); {files} file(s) in the table at the end")


def _metrics(url: str) -> list:
    """The samples of the collector's ``/metrics`` (Prometheus text, read by prometheus_client's parser)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    return [sample for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text) for sample in family.samples]


def _sample(samples: list, name: str, **labels: str) -> float:
    """The value of the sample ``name`` with ``labels`` (where several share the name: a histogram's buckets)."""
    return next(sample.value for sample in samples if sample.name == name and labels.items() <= sample.labels.items())

if __name__ == "__main__":
    main()
