"""Benchmark: the 1M-span triplet pipeline on a lake whose span tables are on S3 (issue 71, finding 5).

    .venv/bin/python benchmarks/s3_read_bench.py --rollouts 35715 --repeat 3

One S3 server (moto's, on this machine) holds the span table that ``triplets_bench.generate`` writes (1,000,020
spans). Timed, alternating, each in the same process:

- ``store``: ``materialize_triplets`` as the control host runs it now: DuckDB reads the objects through the store's
  filesystem (``attach_store``: fsspec over pyarrow's S3 client), nothing written locally.
- ``mirror``: what the control host did before: copy the epoch's data files to local disk (``_mirror``), then the
  same pipeline over the local copies. ``cold`` counts the copy; ``warm`` is a second pipeline run on the copies
  (the copy was kept between epochs, but each epoch's spans are new files, so an epoch's pipeline pays ``cold``).
- ``scan``: the pipeline's first and largest read alone (the columns ``sql/span_nodes.sql`` reads, one epoch's
  partition), three ways: ``read_parquet`` over S3 through the store's filesystem, delta-rs's Arrow dataset of the
  table scanned by DuckDB (projection and partition filter pushed down), and ``read_parquet`` of local copies. The
  pipeline cannot run on the Arrow dataset: it numbers and reads back spans by their file and row
  (``filename``, ``file_row_number``), which an Arrow scan does not give.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import duckdb

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.triplets_bench import generate  # noqa: E402
from lightning_core.config import load_config  # noqa: E402
from lightning_core.pipeline.triplets import materialize_triplets  # noqa: E402
from lightning_core.store.location import arrow_filesystem, attach_store, location, set_location  # noqa: E402
from lightning_core.store.spans import snapshot  # noqa: E402

SCAN = ("SELECT count(*), count(DISTINCT span_id), sum(length(attributes)), max(end_ns) FROM {source} "
        "WHERE run_id = 'bench' AND epoch = 0")
COLUMNS = ["trace_id", "span_id", "parent_id", "name", "start_ns", "end_ns", "status_code", "span_kind", "agent_name",
           "reward_value", "received_ns", "attributes", "events", "rollout_id", "task_id", "attempt"]


def _moto() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    import boto3

    deadline = time.monotonic() + 30
    while True:
        try:
            boto3.client("s3", endpoint_url=url, region_name="us-east-1").create_bucket(Bucket="bench")
            return server, url
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _config(lake: Path, args) -> object:
    return load_config(None, overrides=[f"project_dir={lake.parent}", f"lake.path={lake}",
                                        f"lake.duckdb_memory_limit={args.memory_limit}",
                                        f"lake.duckdb_threads={args.threads}"])


def _copy_lake(s3_lake: Path, local_lake: Path) -> float:
    """The mirror: every object of the span table copied to a local lake (data files and log); return seconds."""
    t = time.perf_counter()
    where = location(s3_lake)
    fs, _ = arrow_filesystem(where)
    import pyarrow.fs as pafs

    prefix = where.table_uri(s3_lake, "training").split("://", 1)[1].rstrip("/")
    target = local_lake / "spans" / "training"
    for info in fs.get_file_info(pafs.FileSelector(prefix, recursive=True)):
        if info.type != pafs.FileType.File:
            continue
        local = target / info.path[len(prefix) + 1:]
        local.parent.mkdir(parents=True, exist_ok=True)
        with fs.open_input_stream(info.path) as src, open(local, "wb") as dst:
            while chunk := src.read(8 << 20):
                dst.write(chunk)
    return time.perf_counter() - t


def _pipeline(cfg) -> float:
    report = materialize_triplets(cfg, run_id="bench", epoch=0)
    assert report.spans > 0
    return report.seconds


def _scan(lake: Path, how: str, threads: int) -> tuple[float, tuple]:
    con = duckdb.connect(config={"threads": str(threads)})
    t = time.perf_counter()
    if how == "arrow":
        from deltalake import DeltaTable

        where = location(lake)
        table = DeltaTable(where.table_uri(lake, "training"), storage_options=where.options or None)
        dataset = table.to_pyarrow_dataset()  # noqa: F841 (DuckDB's replacement scan finds it by name)
        source = "dataset"
    else:
        files = snapshot(lake).files["training"]
        if how == "store":
            attach_store(con, lake)
        source = (f"read_parquet({json.dumps(files)}, hive_partitioning = true, "
                  "hive_types = {'run_id': VARCHAR, 'epoch': BIGINT})")
    row = con.execute(SCAN.format(source=source)).fetchall()[0]
    return time.perf_counter() - t, row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rollouts", type=int, default=35715)
    parser.add_argument("--memory-limit", default="4GB")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_REGION="us-east-1")
    server, url = _moto()
    work = Path(tempfile.mkdtemp(prefix="arclight-s3bench-"))
    try:
        s3_lake = work / "s3" / "lake"
        set_location(s3_lake, "s3://bench/spans", {"AWS_ENDPOINT_URL": url, "AWS_ALLOW_HTTP": "true",
                                                   "conditional_put": "etag"})
        t = time.perf_counter()
        n = generate(s3_lake, rollouts=args.rollouts)
        print(f"generated {n:,} spans on S3 in {time.perf_counter() - t:.1f}s; load {os.getloadavg()[0]:.2f}", flush=True)
        times: dict[str, list[float]] = {k: [] for k in ("store", "mirror cold", "mirror warm", "scan store",
                                                           "scan arrow", "scan local")}
        for i in range(args.repeat):
            local_lake = work / f"mirror-{i}" / "lake"
            load = os.getloadavg()[0]
            copy_s = _copy_lake(s3_lake, local_lake)
            cold = copy_s + _pipeline(_config(local_lake, args))
            warm = _pipeline(_config(local_lake, args))
            store = _pipeline(_config(s3_lake, args))
            scans = {how: _scan(s3_lake if how != "local" else local_lake, how, args.threads)
                     for how in ("store", "arrow", "local")}
            assert len({row for _, row in scans.values()}) == 1, scans  # the three reads see the same spans
            times["store"].append(store)
            times["mirror cold"].append(cold)
            times["mirror warm"].append(warm)
            for how, (seconds, _) in scans.items():
                times[f"scan {how}"].append(seconds)
            print(f"round {i + 1} (load {load:.2f} -> {os.getloadavg()[0]:.2f}): store {store:.2f}s, mirror cold "
                  f"{cold:.2f}s (copy {copy_s:.2f}s), mirror warm {warm:.2f}s; scan: "
                  + ", ".join(f"{how} {seconds:.2f}s" for how, (seconds, _) in scans.items()), flush=True)
            shutil.rmtree(local_lake.parent, ignore_errors=True)
        med = {k: statistics.median(v) for k, v in times.items()}
        print("medians: " + ", ".join(f"{k} {v:.2f}s" for k, v in med.items()))
        print(f"store / mirror cold {med['store'] / med['mirror cold']:.2f}x, store / mirror warm "
              f"{med['store'] / med['mirror warm']:.2f}x, scan arrow / scan store {med['scan arrow'] / med['scan store']:.2f}x, "
              f"scan store / scan local {med['scan store'] / med['scan local']:.2f}x")
    finally:
        os.killpg(server.pid, 15)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
