"""Serving the newest version of every policy: adapters hot-loaded or merged weights reloaded in place, replicas that
died restarted and brought up to the serving versions, the version each policy serves now."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from lightning_core.epoch.context import RunContext
from lightning_core.serving.redeploy import (deploy_adapter, deploy_full_weights, merge_adapter, prune_merged,
                                             restore_adapter)
from lightning_core.serving.vllm import model_dir, redeploy_mode, replica_group, serving_dtype, start_vllm
from lightning_core.trainer.versions import latest_version, version_number
from lightning_core.epoch.stack import Outage


log = logging.getLogger("arclight.deploy")


@dataclass
class Redeployed:
    """One policy version that now serves."""

    policy: str
    version: str
    first_answer_s: float


def deploy_latest(ctx: RunContext, *, revived: list[str] | None = None) -> list[Redeployed]:
    """Make the newest recorded version of every policy serve (no-op where it already does); replicas restarted
    meanwhile (``revived``, default: those this call restarts) get it back."""
    config, stack = ctx.config, ctx.services

    catalog = ctx.catalog
    revived = revive_replicas(ctx) if revived is None else revived
    gateway = stack.gateway_client(config)
    mode = redeploy_mode(config)
    replicas = [r.url for r in stack.replicas]
    deployed = []
    try:
        serving = gateway.policies()["policies"]
        for policy in config.policies:
            latest = latest_version(catalog, policy=policy.name)
            if latest is None:
                continue
            number = version_number(latest["version"])
            full = latest.get("kind") == "full" or mode == "merged"
            # grouped replicas (a frozen agent, several policies): only the policy's own get its weights
            own = [r.url for r in stack.replicas if replica_group(r) == policy.name] or replicas
            if (serving.get(policy.name) or {}).get("version") == number:
                if not full and revived:  # restarted replicas catch up with the adapter the gateway serves
                    restore_adapter(replicas=revived, policy=policy.name, adapter_dir=latest["path"], version=number,
                                    verify_prompt=config.serving.verify_prompt)
                if not (full and set(revived) & set(own)):
                    continue
                own = [url for url in own if url in revived]  # a restarted replica of the policy serves base weights
            if full:
                weights = Path(latest["path"])
                if latest.get("kind") != "full":
                    weights = merge_adapter(base_model_dir=model_dir(config), adapter_dir=weights,
                                            out_dir=weights.with_name(f"{weights.name}.merged"), dtype=serving_dtype(config))
                d = deploy_full_weights(gateway=gateway, replicas=own, policy=policy.name, model_dir=weights,
                                        version=number, verify_prompt=config.serving.verify_prompt)
                if latest.get("kind") != "full":
                    prune_merged(weights, keep=config.serving.keep_versions)
            else:
                d = deploy_adapter(gateway=gateway, replicas=replicas, policy=policy.name, adapter_dir=latest["path"],
                                   version=number, keep_versions=config.serving.keep_versions,
                                   verify_prompt=config.serving.verify_prompt)
            deployed.append(Redeployed(policy.name, latest["version"], d.first_answer_s))
    finally:
        gateway.close()
    return deployed


def revive_replicas(ctx: RunContext) -> list[str]:
    """Restart the vLLM replicas this process started that have exited (an OOM kill, a crash); return their URLs.

    A restarted replica serves the base model and no adapter; ``deploy_latest`` brings it up to the
    serving versions before the next rollouts. Replicas someone else runs are left to them. Each
    restart is recorded as an outage of the stack (rollouts that ran meanwhile are not the agent's).
    """
    from urllib.parse import urlparse


    config, stack = ctx.config, ctx.services
    revived = []
    with stack.lock:
        for i, replica in enumerate(stack.replicas):
            if replica.owned and not replica.alive():
                log.warning("vLLM replica %s at %s exited with status %s: restarting it on the same port (log: %s)",
                            replica.name, replica.url, replica.process.returncode, replica.log_path)
                outage = Outage(replica.name, replica.last_seen or time.time(),
                                f"exited with status {replica.process.returncode}")
                stack.outages.append(outage)
                replica.stop()  # what it left running in its process group (the engine core)
                stack.replicas[i] = start_vllm(config, port=urlparse(replica.url).port, name=replica.name,
                                               log_dir=replica.log_path.parent if replica.log_path else None)
                outage.ended, outage.restarted = time.time(), True
                revived.append(replica.url)
    return revived


def serving_versions(ctx: RunContext) -> dict[str, str]:
    """Return the version each policy serves now ('base' before any training)."""
    config, stack = ctx.config, ctx.services
    gateway = stack.gateway_client(config)
    try:
        serving = gateway.policies()["policies"]
    finally:
        gateway.close()
    labels = {}
    for p in config.policies:
        number = (serving.get(p.name) or {}).get("version") or 0
        labels[p.name] = f"{p.name}-v{number}" if number else "base"
    return labels
