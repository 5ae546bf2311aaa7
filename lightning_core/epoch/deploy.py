"""Serving the newest version of every policy: adapters hot-loaded or merged weights reloaded in place, replicas that
died restarted and brought up to the serving versions, the version each policy serves now."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from lightning_core.common import host_weights, published
from lightning_core.epoch.context import RunContext
from lightning_core.serving.client import GatewayAdminError, GatewayClient
from lightning_core.serving.redeploy import (RELOAD_TIMEOUT_S, RedeployError, deploy_adapter, deploy_full_weights,
                                             merge_adapter, reload_full_weights, restore_adapter)
from lightning_core.serving.vllm import model_dir, redeploy_mode, replica_group, serving_dtype, start_vllm
from lightning_core.trainer.train import SERVING_LEAVES_OUT
from lightning_core.trainer.versions import latest_version, version_name, version_number, version_row
from lightning_core.epoch.stack import Outage


log = logging.getLogger("arclight.deploy")


@dataclass
class Redeployed:
    """One policy version that now serves."""

    policy: str
    version: str
    first_answer_s: float


def deploy_latest(ctx: RunContext, *, revived: list[str] | None = None,
                  versions: dict[str, str] | None = None) -> list[Redeployed]:
    """Make the newest recorded version of every policy serve (no-op where it already does); replicas restarted
    meanwhile (``revived``, default: those this call restarts) get it back. The outage of a replica this call restarts
    ends only once it serves again; when this call fails, such a replica is stopped again (``stop_unrestored``).
    Replicas that reload merged weights are marked as reloading meanwhile (``Stack.reloads``). ``versions`` (policy
    -> version id, or 'base'; ``validation.result_versions``) serves those instead: the run's best validated ones."""
    config, stack = ctx.config, ctx.services

    catalog = ctx.catalog
    restarts = revive_replicas(ctx) if revived is None else []
    revived = [r.url for r in restarts] if revived is None else revived
    gateway = stack.gateway_client(config)
    mode = redeploy_mode(config)
    replicas = [r.url for r in stack.replicas]
    fetched = bool(config.serving.weights_uri)
    deployed = []
    try:
        serving = gateway.policies()["policies"]
        for policy in config.policies:
            chosen = (versions or {}).get(policy.name)
            if chosen == "base":
                deployed += _serve_base(ctx, gateway, policy=policy.name, serving=serving.get(policy.name) or {})
                continue
            latest = version_row(catalog, chosen) if chosen else latest_version(catalog, policy=policy.name)
            if latest is None:
                continue
            number = version_number(latest["version"])
            full = latest.get("kind") == "full" or mode == "merged"
            own = _own_replicas(stack, policy.name)
            if (serving.get(policy.name) or {}).get("version") == number:
                if not full and revived:  # restarted replicas catch up with the adapter the gateway serves
                    restore_adapter(replicas=revived, policy=policy.name, version=number, fetched=fetched,
                                    adapter_dir=folder_for_vllm(config, gateway, Path(latest["path"]), policy=policy.name),
                                    verify_prompt=config.serving.verify_prompt)
                if not (full and set(revived) & set(own)):
                    continue
                own = [url for url in own if url in revived]  # a restarted replica of the policy serves base weights
            if full:
                weights = serving_weights(config, latest)
                folder = folder_for_vllm(config, gateway, weights, policy=policy.name)
                # one replica after another, each within the reload's timeout; none is stuck meanwhile
                with stack.reloads(own, timeout_s=RELOAD_TIMEOUT_S * len(own)):
                    d = deploy_full_weights(gateway=gateway, replicas=own, policy=policy.name, version=number,
                                            model_dir=folder, verify_prompt=config.serving.verify_prompt,
                                            fetched=fetched)
                if latest.get("kind") != "full":
                    host_weights.prune_versions(weights.parent, keep=config.serving.keep_versions,
                                                current=host_weights.version_of(weights.name), only=host_weights.MERGED)
            else:
                d = deploy_adapter(gateway=gateway, replicas=replicas, policy=policy.name, version=number,
                                   adapter_dir=folder_for_vllm(config, gateway, Path(latest["path"]), policy=policy.name),
                                   keep_versions=config.serving.keep_versions,
                                   verify_prompt=config.serving.verify_prompt, fetched=fetched)
            deployed.append(Redeployed(policy.name, latest["version"], d.first_answer_s))
        stack.serving = gateway.policies()["policies"]
    except BaseException:
        stop_unrestored(stack, restarts)
        raise
    finally:
        gateway.close()
    end_outages(restarts)
    return deployed


def _serve_base(ctx: RunContext, gateway: GatewayClient, *, policy: str, serving: dict) -> list[Redeployed]:
    """Serve the starting model for ``policy`` again (the run's best validated version was its start): the gateway
    routes it to the base model, which stays loaded beside adapters; merged weights are reloaded from the model
    folder."""
    if not serving.get("version"):
        return []  # it serves the base model already
    started = time.perf_counter()
    base = gateway.policies()["base_model"]
    if redeploy_mode(ctx.config) == "merged" or version_row(ctx.catalog, version_name(policy, serving["version"])).get(
            "kind") == "full":
        own = _own_replicas(ctx.services, policy)
        with ctx.services.reloads(own, timeout_s=RELOAD_TIMEOUT_S * len(own)):
            deploy_full_weights(gateway=gateway, replicas=own, policy=policy, version=0,
                                model_dir=Path(model_dir(ctx.config)), verify_prompt=ctx.config.serving.verify_prompt)
    else:
        gateway.switch_policy(policy, served_model=base, version=0)
    return [Redeployed(policy, "base", time.perf_counter() - started)]


def restore_policy_table(ctx: RunContext) -> None:
    """Give a restarted gateway the policy table the last redeploy left (``Stack.serving``): the versions vLLM serves
    and rollouts in flight are pinned to, each policy's earlier ones first so that its rollback history is rebuilt.
    A version trained since (asynchronous epochs) waits for the next redeploy."""
    if not ctx.services.serving:  # no redeploy in this process yet: the newest versions are what it serves
        deploy_latest(ctx, revived=[])
        return
    gateway = ctx.services.gateway_client(ctx.config)
    try:
        for policy, state in ctx.services.serving.items():
            history = [(h["served_model"], h["version"]) for h in reversed(state.get("history") or [])]
            for served_model, version in [*history, (state.get("served_model"), state.get("version") or 0)]:
                if served_model:
                    gateway.switch_policy(policy, served_model=served_model, version=version)
    finally:
        gateway.close()


def restore_serving(ctx: RunContext, *, revived: list[str]) -> None:
    """Give restarted replicas (``revived``) exactly what the gateway serves now -- the versions rollouts in flight are
    pinned to -- and nothing newer: each policy's serving adapter and the earlier ones kept for rollback, or the
    serving version's (merged) weights. The version just trained beside the rollouts (asynchronous epochs) waits for
    the next redeploy."""
    config, stack = ctx.config, ctx.services
    serving = gateway_policies(ctx)
    full_mode = redeploy_mode(config) == "merged"
    fetched = bool(config.serving.weights_uri)
    gateway = stack.gateway_client(config)
    try:
        _restore(ctx, serving, revived=revived, full_mode=full_mode, fetched=fetched, gateway=gateway)
    finally:
        gateway.close()


def _restore(ctx: RunContext, serving: dict, *, revived: list[str], full_mode: bool, fetched: bool,
             gateway: GatewayClient) -> None:
    config, stack = ctx.config, ctx.services
    for policy in config.policies:
        state = serving.get(policy.name) or {}
        number = state.get("version") or 0
        if not number:
            continue  # the base model: a restarted replica serves it already
        row = version_row(ctx.catalog, version_name(policy.name, number))
        if row.get("kind") == "full" or full_mode:  # weights replaced in place: no earlier version stays loaded
            own = [url for url in _own_replicas(stack, policy.name) if url in revived]
            if own:
                weights = folder_for_vllm(config, gateway, serving_weights(config, row), policy=policy.name)
                reload_full_weights(replicas=own, policy=policy.name, model_dir=weights, fetched=fetched,
                                    served_model=state["served_model"], verify_prompt=config.serving.verify_prompt)
            continue
        for kept in [number, *(h["version"] for h in state.get("history") or [])]:
            if kept:
                adapter = row if kept == number else version_row(ctx.catalog, version_name(policy.name, kept))
                restore_adapter(replicas=revived, policy=policy.name, version=kept, fetched=fetched,
                                adapter_dir=folder_for_vllm(config, gateway, Path(adapter["path"]), policy=policy.name),
                                verify_prompt=config.serving.verify_prompt)


def folder_for_vllm(config, gateway: GatewayClient, folder: Path, *, policy: str, name: str | None = None) -> str:
    """The folder vLLM loads ``folder`` from: the folder itself on one machine; with ``serving.weights_uri``, the copy
    that the gateway beside vLLM fetched to its own disk and checked against the published manifest, under ``name``
    (default the folder's). A folder made here (merged weights, an adapter deployed by hand) is published first; one
    the trainer published already is left as it is."""
    uri = config.serving.weights_uri
    if not uri:
        return str(folder)
    target = published.join(uri, policy, name or folder.name)
    try:
        if folder.is_dir():
            published.publish(folder, target, options=config.serving.weights_storage_options,
                              leave_out=SERVING_LEAVES_OUT)
        return gateway.fetch_weights(target)["path"]
    except (published.PublishError, GatewayAdminError) as exc:
        raise RedeployError(f"{folder.name} could not reach vLLM's host through {target}: {exc}") from None


def serving_weights(config, row: dict) -> Path:
    """The weights folder vLLM reloads for a version: the full checkpoint, or the adapter merged into the base model
    (made once, next to the adapter; by the train host, and published by name, when a train host trained it)."""
    weights = Path(row["path"])
    if row.get("kind") == "full":
        return weights
    if config.serving.weights_uri and not weights.is_dir():  # trained on a train host, which merged and published it
        return weights.with_name(f"{weights.name}.merged")
    return merge_adapter(base_model_dir=model_dir(config), adapter_dir=weights,
                         out_dir=weights.with_name(f"{weights.name}.merged"), dtype=serving_dtype(config))


def _own_replicas(stack, policy: str) -> list[str]:
    """The replicas that serve ``policy``: its group's (a frozen agent, several policies), else every replica."""
    return [r.url for r in stack.replicas if replica_group(r) == policy] or [r.url for r in stack.replicas]


@dataclass
class Revived:
    """A replica restarted on its port, and its outage, which lasts until it serves what it served before."""

    url: str
    outage: Outage


def revive_replicas(ctx: RunContext) -> list[Revived]:
    """Restart the vLLM replicas this process started that have exited (an OOM kill, a crash, or stopped because they
    were stuck or not restored); return them with their outages, which stay open: the caller ends them
    (``end_outages``) once the replicas serve again what rollouts are pinned to, or stops them again
    (``stop_unrestored``).

    A restarted replica serves the base model and no adapter. Replicas someone else runs are left to them. A replica
    whose outage is still open (found stuck, or an earlier restart not restored) keeps that outage instead of a new one.
    """
    from urllib.parse import urlparse

    config, stack = ctx.config, ctx.services
    revived = []
    stack.raise_failure()  # the supervisor already gave up on one: the run is stopping with its error
    with stack.locked():
        for i, replica in enumerate(stack.replicas):
            if replica.owned and not replica.alive():
                log.warning("vLLM replica %s at %s exited with status %s: restarting it on the same port (log: %s)",
                            replica.name, replica.url, replica.process.returncode, replica.log_path)
                outage = stack.open_outage(replica.name) or Outage(
                    replica.name, replica.last_seen or time.time(), f"exited with status {replica.process.returncode}")
                if outage not in stack.outages:
                    stack.outages.append(outage)
                replica.stop()  # what it left running in its process group (the engine core)
                stack.replicas[i] = start_vllm(config, port=urlparse(replica.url).port, name=replica.name,
                                               log_dir=replica.log_path.parent if replica.log_path else None)
                outage.restarted = True
                revived.append(Revived(replica.url, outage))
    return revived


def end_outages(revived: list[Revived]) -> None:
    """The restarted replicas serve what they served before: their outages are over."""
    for r in revived:
        r.outage.ended = time.time()


def stop_unrestored(stack, revived: list[Revived]) -> None:
    """Stop restarted replicas that could not be given back what they served: alive, they would answer with the base
    model the calls the gateway records under the version it serves. Their outages stay open, and the next start (the
    supervisor's, or the next redeploy's) tries again from the start: after a failed reload vLLM's engine is dead."""
    urls = {r.url for r in revived}
    with stack.locked():
        for replica in stack.replicas:
            if replica.owned and replica.url in urls:
                log.warning("vLLM replica %s at %s was restarted but not given back what it served: stopping it",
                            replica.name, replica.url)
                replica.stop()


def gateway_policies(ctx: RunContext) -> dict[str, dict]:
    """What the gateway serves now, per policy name (its ``/admin/policies`` answer)."""
    gateway = ctx.services.gateway_client(ctx.config)
    try:
        return gateway.policies()["policies"]
    finally:
        gateway.close()


def serving_versions(ctx: RunContext) -> dict[str, str]:
    """Return the version each policy serves now ('base' before any training)."""
    config, serving = ctx.config, gateway_policies(ctx)
    labels = {}
    for p in config.policies:
        number = (serving.get(p.name) or {}).get("version") or 0
        labels[p.name] = f"{p.name}-v{number}" if number else "base"
    return labels
