"""Delta Lake (delta-rs, what the span store uses) against Apache Iceberg (pyiceberg, SQLite catalog) for span tables.

    .venv/bin/python -m pip install 'arclight[iceberg-bench]'   # pyiceberg with its SQLite catalog
    .venv/bin/python benchmarks/table_format_bench.py --writers 2 --commits 50 --spans 1050

The same workload on each format, in this order, one format at a time:

1. ``--writers`` processes append ``--commits`` commits each, at the same time, to one table
   partitioned by (run_id, epoch); every commit is one real collector request's spans
   (``ingest.tables.request_to_tables`` of ``ingest_bench.build_request``: ~1,050 spans, a third with 240
   token ids). Printed: commit latency p50/p99 and commits/s over all writers, how many commits
   failed after the format's own retries, and (Iceberg) how many retries there were.
2. DuckDB 2.0 counts the rows and the distinct (trace_id, span_id) of the current snapshot's files
   (Delta: ``DeltaTable.file_uris``; Iceberg: ``scan().plan_files``): both must equal what the writers
   committed. Printed: the time to list the snapshot's files and to count.
3. Compaction with the format's own operation, then the same count (Delta: ``optimize.compact``;
   pyiceberg has no data-file compaction, which the script reports).

Delta goes through Arclight's own ``Lake.write`` (which also fsyncs each commit's files and log
entry); pyiceberg writes without fsync, which favours it. ``uptime`` is printed with the results.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import duckdb  # noqa: E402

from ingest_bench import build_request  # noqa: E402
from lightning_core.store import span_schema  # noqa: E402
from lightning_core.store import spans as lake  # noqa: E402
from lightning_core.ingest.tables import request_to_tables  # noqa: E402

RUN = "formats"


def span_tables(writer: int, commits: int, spans: int):
    """The Arrow table of each commit of one writer: the collector's own conversion of a real request."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    tables = []
    for i in range(commits):
        body = build_request(writer * commits + i, spans=spans, run_id=RUN)
        [(partition, table)] = request_to_tables(ExportTraceServiceRequest.FromString(body)).items()
        tables.append((partition, table))
    return tables


def delta_writer(root: str, writer: int, commits: int, spans: int, start, queue) -> None:
    tables = span_tables(writer, commits, spans)
    store = lake.Lake(root)
    store.table("training")
    latencies, failed = [], 0
    queue.put("ready")
    start.wait()
    for partition, table in tables:
        t = time.perf_counter()
        try:
            store.write({partition: table})
        except Exception as exc:  # noqa: BLE001 - counted and reported
            failed += 1
            print(f"delta writer {writer}: commit failed: {exc!r}", file=sys.stderr)
        latencies.append(time.perf_counter() - t)
    queue.put((latencies, failed, None))


def iceberg_catalog(root: str):
    from pyiceberg.catalog.sql import SqlCatalog

    return SqlCatalog("bench", uri=f"sqlite:///{root}/catalog.db", warehouse=f"file://{root}/warehouse")


def iceberg_create(root: str) -> None:
    catalog = iceberg_catalog(root)
    catalog.create_namespace("arclight")
    table = catalog.create_table("arclight.spans", schema=span_schema.table_schema("training"))
    with table.update_spec() as update:  # partitioned as the Delta table: by run and epoch
        update.add_identity("run_id")
        update.add_identity("epoch")


class _Retries(logging.Handler):
    """Counts pyiceberg's "Commit failed due to a concurrent update, retrying" messages."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += "retrying" in record.getMessage()


def iceberg_writer(root: str, writer: int, commits: int, spans: int, start, queue) -> None:
    retries = _Retries()
    logging.getLogger("pyiceberg").addHandler(retries)
    logging.getLogger("pyiceberg").propagate = False
    tables = span_tables(writer, commits, spans)
    table = iceberg_catalog(root).load_table("arclight.spans")
    schema = span_schema.table_schema("training")
    latencies, failed = [], 0
    queue.put("ready")
    start.wait()
    for partition, data in tables:
        data = span_schema.with_partition_columns(data, partition).cast(schema)
        t = time.perf_counter()
        try:
            table.append(data)
        except Exception as exc:  # noqa: BLE001 - counted and reported
            failed += 1
            print(f"iceberg writer {writer}: commit failed: {exc!r}", file=sys.stderr)
            table = iceberg_catalog(root).load_table("arclight.spans")
        latencies.append(time.perf_counter() - t)
    queue.put((latencies, failed, retries.count))


def delta_files(root: str) -> list[str]:
    return lake.open_table(root, "training", create=False).file_uris()


def iceberg_files(root: str) -> list[str]:
    table = iceberg_catalog(root).load_table("arclight.spans")
    return [task.file.file_path.removeprefix("file://") for task in table.scan().plan_files()]


def count(files: list[str]) -> tuple[int, int, float]:
    t = time.perf_counter()
    rows, distinct = duckdb.connect().execute(
        "SELECT count(*), count(DISTINCT (trace_id, span_id)) FROM read_parquet(?)", [files]
    ).fetchone()
    return rows, distinct, time.perf_counter() - t


def delta_compact(root: str) -> str:
    table = lake.open_table(root, "training", create=False)
    metrics = table.optimize.compact()
    return f"optimize.compact: {metrics['numFilesRemoved']} files -> {metrics['numFilesAdded']}"


def iceberg_compact(root: str) -> str | None:
    """None: pyiceberg 0.12 rewrites no data files (compaction needs Spark or another engine)."""
    table = iceberg_catalog(root).load_table("arclight.spans")
    if hasattr(table, "rewrite_data_files"):
        raise SystemExit("this pyiceberg has rewrite_data_files: measure it here before reporting that it has none")
    return None


def run(fmt: str, args) -> None:
    root = tempfile.mkdtemp(prefix=f"arclight-{fmt}-")
    try:
        writer, files_of, compact = {
            "delta": (delta_writer, delta_files, delta_compact),
            "iceberg": (iceberg_writer, iceberg_files, iceberg_compact),
        }[fmt]
        if fmt == "iceberg":
            iceberg_create(root)
        else:
            lake.Lake(root).table("training")
        ctx = mp.get_context("spawn")
        queue, start = ctx.Queue(), ctx.Event()
        procs = [ctx.Process(target=writer, args=(root, w, args.commits, args.spans, start, queue)) for w in range(args.writers)]
        for p in procs:
            p.start()
        for _ in procs:  # every writer has converted its requests before the clock starts
            assert queue.get() == "ready"
        started = time.perf_counter()
        start.set()
        results = [queue.get() for _ in procs]
        elapsed = time.perf_counter() - started
        for p in procs:
            p.join()
        latencies = sorted(x for lat, _, _ in results for x in lat)
        failed = sum(f for _, f, _ in results)
        retried = "" if results[0][2] is None else f", {sum(r for _, _, r in results)} retries after a concurrent commit"
        expected = (args.writers * args.commits - failed) * args.spans
        t = time.perf_counter()
        files = files_of(root)
        listed = time.perf_counter() - t
        rows, distinct, counted = count(files)
        ok = "ok" if rows == distinct == expected else f"MISMATCH (expected {expected})"
        print(f"{fmt:8s} {args.writers} writers x {args.commits} commits of {args.spans} spans: "
              f"{len(latencies) / elapsed:5.1f} commits/s, {len(latencies) * args.spans / elapsed:,.0f} spans/s; "
              f"commit p50 {latencies[len(latencies) // 2] * 1000:.0f} ms p99 {latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000:.0f} ms; "
              f"failed {failed}{retried}")
        print(f"{'':8s} snapshot: {len(files)} files listed in {listed * 1000:.0f} ms; DuckDB counted {rows:,} rows, "
              f"{distinct:,} distinct ids in {counted * 1000:.0f} ms: {ok}")
        note = compact(root)
        if note is None:
            print(f"{'':8s} compaction: none in pyiceberg (no rewrite_data_files); the table keeps {len(files)} files")
        else:
            files = files_of(root)
            rows, distinct, counted = count(files)
            print(f"{'':8s} compaction: {note}; then {len(files)} files, {rows:,} rows ({distinct:,} distinct), counted in {counted * 1000:.0f} ms")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writers", type=int, default=2)
    parser.add_argument("--commits", type=int, default=50, help="commits per writer")
    parser.add_argument("--spans", type=int, default=1050, help="spans per commit")
    parser.add_argument("--format", action="append", choices=["delta", "iceberg"], help="default: both")
    args = parser.parse_args()
    for fmt in args.format or ["delta", "iceberg"]:
        run(fmt, args)
    print(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())


if __name__ == "__main__":
    main()
