"""Train one version of the tiny Llama with ``trainer.executor: ray``, as the flow's training stage does, and say what
happened as JSON lines on standard output (tests/test_train_hosts.py, tests/test_hosts.py run it).

    python -m tests.helpers.train_driver --project DIR --model TINY --address HOST:PORT --weights file:///... \
        --mlflow URI --processes 2 [--local]

``--local`` trains the same samples in this process instead (the reference the ranks must equal). Lines:
``{"event": "trained", ...}`` or ``{"event": "failed", "error": ..., "type": ...}``, then ``{"event": "catalog", ...}``.
"""

from __future__ import annotations

import argparse
import json
import sys


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--project", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--address")
    parser.add_argument("--weights", required=True, help="serving.weights_uri")
    parser.add_argument("--weights-options", default="{}", help="serving.weights_storage_options, as JSON")
    parser.add_argument("--mlflow", required=True)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--groups", type=int, default=3)
    parser.add_argument("--tokens-per-step", type=int, default=80)
    parser.add_argument("--passes", type=int, default=1)
    parser.add_argument("--epoch", type=int, default=0)
    parser.add_argument("--resources", default='{"train": 1}', help="trainer.ray_resources, as JSON")
    parser.add_argument("--local", action="store_true")
    args = parser.parse_args()

    from lightning_core.config import load_config
    from lightning_core.store.catalog import Catalog
    from lightning_core.trainer.train import train_policies
    from tests.tiny_llama import make_triplets, triplet_table

    config = load_config(None, overrides=[
        f"project_dir={args.project}", "name=hosts", f"model.path={args.model}", "trainer.micro_batch_size=3",
        f"trainer.tokens_per_step={args.tokens_per_step}", f"trainer.passes={args.passes}", "trainer.learning_rate=0.02",
        "trainer.lora_r=4", "trainer.lora_alpha=8", "trainer.log_samples=0", "trainer.shared_prefix=off",
        f"trainer.processes={args.processes}", f"serving.weights_uri={args.weights}", f"tracking.mlflow_uri={args.mlflow}",
        "serving.redeploy=lora", *([f"trainer.address={args.address}"] if args.address else [])],
        values={"serving.weights_storage_options": json.loads(args.weights_options),
                "trainer.ray_resources": json.loads(args.resources)}).resolved()
    executor = None
    if not args.local:
        from lightning_core.epoch.train_hosts import ray_executor

        executor = ray_executor(config)
    rows = triplet_table(make_triplets(groups=args.groups, per_group=4, rewarded=1, seed=2 + args.epoch, epoch=args.epoch))
    catalog = Catalog.from_config(config)
    try:
        [result] = train_policies(config, run_id="r1", epoch=args.epoch, base_model_dir=args.model,
                                  triplets={"default": rows}, catalog=catalog, executor=executor)
        print(json.dumps({"event": "trained", "version": result.version, "path": str(result.path),
                          "message": result.message, "losses": [s.get("loss") for s in result.steps],
                          "world_sizes": [s.get("world_size") for s in result.steps],
                          "micro_batches": [s.get("micro_batches") for s in result.steps],
                          "rank0_micro_batches": [s.get("micro_batches/rank") for s in result.steps],
                          "mlflow_run_id": result.mlflow_run_id}), flush=True)
    except Exception as exc:  # noqa: BLE001 - the test reads what failed
        print(json.dumps({"event": "failed", "type": type(exc).__name__, "error": str(exc)}), flush=True)
    with catalog.read(spans=False) as con:
        rows = con.execute("SELECT version, path FROM policy_versions ORDER BY created_at").fetchall()
    print(json.dumps({"event": "catalog", "versions": [list(r) for r in rows]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
