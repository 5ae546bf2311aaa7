"""An analyst in another process (tests/test_flows.py): one ``analyst.connect`` held for the whole
flow run, refreshed and queried in a loop until ``<out>.stop`` appears; one JSON line per poll.

    python -m tests.helpers.analyst_poller <lake> <catalog file> <run_id> <out.jsonl>
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from lightning_core import analyst
from lightning_core.store.catalog import Catalog


def main(lake: str, catalog: str, run_id: str, out: str) -> None:
    con = analyst.connect(Catalog(lake, catalog))
    stop = Path(out + ".stop")
    with open(out, "w") as fh:
        while not stop.exists():
            started = time.monotonic()
            try:
                snap = analyst.refresh(con)
                raw, distinct, spans = con.execute(
                    "SELECT count(*), count(DISTINCT (trace_id, span_id)), "
                    "(SELECT count(*) FROM spans WHERE run_id = $run) FROM spans_raw WHERE run_id = $run",
                    {"run": run_id}).fetchall()[0]
                epochs = con.execute("SELECT count(*) FROM epochs WHERE run_id = $run AND status = 'completed'",
                                     {"run": run_id}).fetchall()[0][0]
                triplets = 0  # the output views exist once the lake's first pipeline run placed their schema files
                if con.execute("SELECT count(*) FROM duckdb_views() WHERE view_name = 'triplets'").fetchall()[0][0]:
                    triplets = con.execute("SELECT count(*) FROM triplets WHERE run_id = $run", {"run": run_id}).fetchall()[0][0]
                outputs = dict(con.execute("SELECT * FROM lake_snapshot").fetchall())
                record = {"raw": raw, "distinct": distinct, "spans": spans, "completed_epochs": epochs,
                          "version": snap.versions["training"], "triplets": triplets,
                          "triplets_version": outputs["triplets"], "seconds": round(time.monotonic() - started, 3)}
                if not raw == distinct == spans:  # what the test's failure message shows: the copies, where they lie
                    record["copies"] = con.execute(
                        "SELECT name, epoch, filename, received_ns FROM spans_raw WHERE run_id = $run "
                        "QUALIFY count(*) OVER (PARTITION BY trace_id, span_id) > 1 ORDER BY trace_id, span_id LIMIT 20",
                        {"run": run_id}).fetchall()
            except Exception as exc:  # noqa: BLE001 - reported to the test
                record = {"error": f"{type(exc).__name__}: {exc}"}
            fh.write(json.dumps(record) + "\n")
            fh.flush()
            time.sleep(0.2)


if __name__ == "__main__":
    main(*sys.argv[1:5])
