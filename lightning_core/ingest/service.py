"""The collector as a server process: started for a project's config on its lake (or attached to a running one), in
its own session, stopped with the rest of the stack (``common.services``)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from lightning_core.common.services import Service, attach, free_port, start_process
from lightning_core.config import ArclightConfig


STORAGE_OPTIONS_ENV = "ARCLIGHT_LAKE_STORAGE_OPTIONS"  # lake.storage_options as JSON, for `arclight collector`


def storage_options_from_environment(config: ArclightConfig) -> ArclightConfig:
    """``config`` with ``$ARCLIGHT_LAKE_STORAGE_OPTIONS`` (a JSON object) under its own ``lake.storage_options``: how
    a collector gets S3 keys without them on its command line."""
    raw = os.environ.get(STORAGE_OPTIONS_ENV)
    if not raw:
        return config
    try:
        options = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{STORAGE_OPTIONS_ENV}: expected a JSON object of storage options, found invalid JSON "
                         f"({exc.msg} at character {exc.pos})") from None
    if not isinstance(options, dict):
        raise ValueError(f"{STORAGE_OPTIONS_ENV}: expected a JSON object of storage options, found {type(options).__name__}")
    merged = {**{str(k): str(v) for k, v in options.items()}, **config.lake.storage_options}
    return config.model_copy(update={"lake": config.lake.model_copy(update={"storage_options": merged})})


def start_collector(config: ArclightConfig, *, log_dir: Path | None = None, timeout_s: float = 60.0,
                    wait: bool = True) -> Service:
    """Start ``arclight collector`` for this config's lake, or attach to ``collector.endpoint``. ``wait=False``: return
    once it runs, for the caller to wait on beside other starts (``services.wait_all_healthy``)."""
    c = config.collector
    if c.endpoint:
        return attach("collector", c.endpoint, setting="collector.endpoint")
    log_dir = log_dir or config.project_dir / ".arclight" / "logs"
    if c.port == 0:
        c = c.model_copy(update={"port": free_port(c.host if c.host != "0.0.0.0" else "127.0.0.1")})
    argv = [
        sys.executable, "-m", "lightning_core", "collector",
        "--lake", str(config.lake.path), "--host", c.host, "--port", str(c.port),
        "--set", f"collector.max_body_bytes={c.max_body_bytes}",
        "--set", f"collector.max_inflight_bytes={c.max_inflight_bytes}",
        "--set", f"collector.max_partitions_per_request={c.max_partitions_per_request}",
        "--set", f"collector.flush_interval_ms={c.flush_interval_ms}",
        "--set", f"collector.compact_min_files={c.compact_min_files}",
        "--set", f"collector.compact_idle_s={c.compact_idle_s}",
        "--set", f"collector.compact_max_files={c.compact_max_files}",
        "--set", f"collector.retention_hours={c.retention_hours}",
        "--set", f"collector.log_retention_s={c.log_retention_s}",
        "--set", f"collector.checkpoint_interval={c.checkpoint_interval}",
        "--set", f"collector.workers={c.workers}",
        "--set", f"collector.compact={str(c.compact).lower()}",
        "--log-level", "warning",
        # the span tables' place (object storage), which the collector records in the lake folder it is given
        *(["--set", f"lake.spans_uri={config.lake.spans_uri}"] if config.lake.spans_uri else []),
    ]
    # secrets go in its environment, which only its user can read, never on its command line, which `ps` shows all
    env = {"ARCLIGHT_COLLECTOR_TOKEN": c.token} if c.token else {}
    if config.lake.spans_uri and config.lake.storage_options:
        env[STORAGE_OPTIONS_ENV] = json.dumps(config.lake.storage_options)
    return start_process(
        "collector", argv, url=c.url, health_url=f"{c.url}/healthz",
        log_path=log_dir / "collector.log", env=env, timeout_s=timeout_s, wait=wait,
    )
