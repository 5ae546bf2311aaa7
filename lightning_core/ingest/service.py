"""The collector as a server process: started for a project's config on its lake (or attached to a running one), in
its own session, stopped with the rest of the stack (``common.services``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from lightning_core.common.services import Service, attach, free_port, start_process
from lightning_core.config import ArclightConfig


def start_collector(config: ArclightConfig, *, log_dir: Path | None = None, timeout_s: float = 60.0) -> Service:
    """Start ``arclight collector`` for this config's lake, or attach to ``collector.endpoint``."""
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
        *(["--set", f"lake.spans_uri={config.lake.spans_uri}",
            "--set", f"lake.storage_options={json.dumps(config.lake.storage_options)}"] if config.lake.spans_uri else []),
    ]
    env = {"ARCLIGHT_COLLECTOR_TOKEN": c.token} if c.token else {}
    return start_process(
        "collector", argv, url=c.url, health_url=f"{c.url}/healthz",
        log_path=log_dir / "collector.log", env=env, timeout_s=timeout_s,
    )
