"""Kill one of a training run's servers, as a crash or an OOM kill would, and report what the run did about it.

    .venv/bin/python scripts/fault_probe.py examples/calc/config.yaml --epochs 3 --kill vllm --at-epoch 1 --after-s 0
    .venv/bin/python scripts/fault_probe.py examples/calc/config.yaml --epochs 3 --kill collector --at-epoch 1 --after-s 6

Runs ``arclight train`` on a copy of the example's folder (its own lake, state, checkpoints and MLflow store, free
ports), as a user does: in its own session, output to ``<copy>/train.log``. Once epoch ``--at-epoch`` has started
its rollouts and ``--after-s`` seconds have passed, it SIGKILLs the process group of the server named by ``--kill``
(the vLLM replica, the collector or the gateway); ``--kill none`` only runs. Then it prints the command's exit code
and wall time, the run's summary as the user saw it, and what the lake says: the rollouts our services failed, the
ones that ran again, and the triplets of any rollout whose kept attempt our services failed (there must be none).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lightning_core.store.catalog import Catalog  # noqa: E402
from lightning_core.config import load_config  # noqa: E402
from lightning_core.common.services import free_port  # noqa: E402
from tests.helpers.processes import pids_matching  # noqa: E402

PATTERNS = {"vllm": r"vllm\.entrypoints\.openai\.api_server .*--port {serving} ",
            "collector": r"lightning_core collector .*--port {collector} ",
            "gateway": r"lightning_core gateway .*--port {gateway} "}


def rollouts_started(cfg, epoch: int) -> bool:
    """True once some rollout of ``epoch`` has finished or the epoch's rollouts are planned and running."""
    try:
        with Catalog.from_config(cfg).read(spans=False) as con:
            rows = con.execute("SELECT count(*) FROM rollouts WHERE run_id = ? AND epoch = ? AND mode = 'train'",
                               [cfg.run_name, epoch]).fetchall()
    except Exception:  # the state tables are not made yet
        return False
    return rows[0][0] > 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=Path)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--kill", choices=["vllm", "collector", "gateway", "none"], default="vllm")
    parser.add_argument("--at-epoch", type=int, default=1)
    parser.add_argument("--after-s", type=float, default=0.0, help="seconds after the epoch's rollouts start")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override KEY=VALUE")
    args = parser.parse_args()

    source = args.config.resolve().parent
    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"arclight-probe-{args.kill}-{time.strftime('%Y%m%d-%H%M%S')}"
    shutil.copytree(source, work, ignore=shutil.ignore_patterns(".arclight", "mlflow.db", "mlartifacts"))
    config = work / args.config.name
    ports = {"collector": free_port(), "gateway": free_port(), "serving": free_port()}
    overrides = [f"{k}.port={v}" for k, v in ports.items()] + args.overrides
    cfg = load_config(config, overrides=overrides)
    command = [str(Path(sys.executable).with_name("arclight")), "train", str(config), "--epochs", str(args.epochs),
               *[a for o in overrides for a in ("--set", o)]]
    print(f"$ {' '.join(command)}\nload before: {os.getloadavg()}", flush=True)
    log = work / "train.log"
    started = time.monotonic()
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO,
                                start_new_session=True)
    killed_at = None
    try:
        if args.kill != "none":
            while proc.poll() is None and not rollouts_started(cfg, args.at_epoch):
                time.sleep(0.5)
            time.sleep(args.after_s)
            found = pids_matching(PATTERNS[args.kill].format(**ports))
            if proc.poll() is None and found:
                os.killpg(found[0], signal.SIGKILL)
                killed_at = time.strftime("%H:%M:%S")
                print(f"{killed_at}: SIGKILL to {args.kill} (process group {found[0]}) "
                      f"{time.monotonic() - started:.0f} s into the run", flush=True)
        code = proc.wait()
    except KeyboardInterrupt:
        os.killpg(proc.pid, signal.SIGINT)
        code = proc.wait()
    wall = time.monotonic() - started
    text = log.read_text(errors="replace")
    summary = text[text.rfind("run " + cfg.run_name):] if ("run " + cfg.run_name) in text else text[-6000:]
    print(f"exit code {code} after {wall / 60:.1f} min; load after: {os.getloadavg()}\n--- what the user saw last ---")
    print(summary[-8000:])
    with Catalog.from_config(cfg).read() as con:
        ours = con.execute(
            "SELECT epoch, count(*) FILTER (WHERE infra_failures > 0), "
            "count(*) FILTER (WHERE status <> 'planned' AND error_kind = 'infrastructure'), count(*) "
            "FROM rollouts WHERE run_id = ? AND mode = 'train' GROUP BY 1 ORDER BY 1", [cfg.run_name]).fetchall()
        trained_ours = con.execute(
            "SELECT count(*) FROM triplets t JOIN rollouts r USING (rollout_id) WHERE t.run_id = ? "
            "AND (r.error_kind = 'infrastructure' OR t.attempt <> r.attempt OR r.status <> 'succeeded')",
            [cfg.run_name]).fetchall()[0][0]
        failed_calls = con.execute(
            "SELECT count(*) FROM triplets t JOIN spans s ON s.trace_id = t.trace_id AND s.span_id = t.span_id "
            "WHERE t.run_id = ? AND json_extract(s.attributes, '$.\"arclight.llm.upstream_failed\"')::BOOLEAN",
            [cfg.run_name]).fetchall()[0][0]
        incidents = con.execute("SELECT epoch, incidents FROM epochs WHERE run_id = ? AND incidents IS NOT NULL",
                                [cfg.run_name]).fetchall()
    print("--- the lake ---")
    for epoch, retried, left_out, total in ours:
        print(f"epoch {epoch}: {total} rollouts, {retried} ran again after our services failed them, {left_out} left out")
    for epoch, text in incidents:
        print(f"epoch {epoch} incidents: {text}")
    print(f"triplets of an attempt our services failed, or of a rollout that did not succeed: {trained_ours}")
    print(f"triplets of a call the gateway marked upstream_failed: {failed_calls}")
    collector_log = (work / ".arclight" / "logs" / "collector.log")
    if collector_log.exists():
        errors = [line for line in collector_log.read_text(errors="replace").splitlines() if " ERROR " in line]
        print(f"collector log: {len(errors)} ERROR lines" + (f" (first: {errors[0][:200]})" if errors else ""))
    exports = len(re.findall(r"Failed to export|Transient error", text))
    print(f"exporter failures reported in the command's output: {exports}\nproject: {work}")


if __name__ == "__main__":
    main()
