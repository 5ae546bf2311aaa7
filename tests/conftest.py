"""Shared fixtures: real servers started once per session and stopped at the end."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

import pytest

from lightning_core.store.catalog import Catalog
from lightning_core.config import ArclightConfig, load_config
from lightning_core.common.services import Service, free_port
from lightning_core.ingest.service import start_collector
# hooks: SIGTERM unwinds like Ctrl-C, and a stopped run names the test it was in
from tests.helpers.sigterm import pytest_configure, pytest_keyboard_interrupt, pytest_runtest_protocol  # noqa: F401

REPO = Path(__file__).resolve().parents[1]


# Fixtures that start (or are) a vLLM, a whole training run or a Prefect API: a test that uses one is an integration
# test, and `make test-fast` (-m "not integration") must start none of them.
SERVER_FIXTURES = {"vllm_server", "gateway", "main_job", "prefect_harness"}


def _runs_without_integration(config: pytest.Config) -> bool:
    expression = " ".join((config.getoption("markexpr", "") or "").split())
    return "not integration" in expression


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the xdist_group marks to group
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Refuse a test that uses a server fixture but is not marked ``integration``: it would start vLLM (or a Prefect
    API, or a training run) inside ``make test-fast``, which promises none.

    Integration tests never run two at once (vLLM, a training run, the hosts test at 15.6 GiB): ``make test`` runs
    one process. Under ``--dist loadgroup`` they carry the group ``integration`` (one worker), which pytest-xdist
    3.8.0 honours on pytest < 9.2 only (pytest-xdist#1386): a run whose integration tests spread over two workers
    fails (``pytest_sessionfinish`` below).

    Integration tests run first, opening with the hosts test, before any session server holds memory (in file order
    it came after the session's vLLMs had taken several GiB)."""
    for item in items:
        if item.get_closest_marker("integration") is not None:
            item.add_marker(pytest.mark.xdist_group("integration"))
    items.sort(key=_lane_order)  # stable: file order otherwise
    unmarked = [item.nodeid for item in items if item.get_closest_marker("integration") is None
                and any(_uses_the_sessions(item, name) for name in SERVER_FIXTURES)]
    if unmarked:
        raise pytest.UsageError(f"{len(unmarked)} test(s) use a server fixture ({', '.join(sorted(SERVER_FIXTURES))}) "
                                f"but are not marked integration: {', '.join(unmarked)}. Add "
                                "@pytest.mark.integration (or pytestmark) so `make test-fast` does not start them")


FIRST_IN_THE_INTEGRATION_LANE = ("tests/test_hosts.py",)

# Under xdist (on the controller): the worker each integration test ran on. More than one means two heavy tests ran
# at once: with pytest 9.2, xdist 3.8.0's loadgroup silently grouped nothing, and Ray's memory monitor killed a rank
# of the hosts test (pytest-xdist#1386). The run then fails, whatever passed.
_INTEGRATION_WORKERS: dict[str, int] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    worker = getattr(report, "node", None)  # set on the controller's copy of a worker's report
    if worker is not None and report.when == "call" and "integration" in report.keywords:
        name = worker.gateway.id
        _INTEGRATION_WORKERS[name] = _INTEGRATION_WORKERS.get(name, 0) + 1


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if len(_INTEGRATION_WORKERS) > 1:
        ran = ", ".join(f"{n} on {w}" for w, n in sorted(_INTEGRATION_WORKERS.items()))
        session.config.get_terminal_writer().line(
            f"\nerror: the integration tests ran on {len(_INTEGRATION_WORKERS)} workers ({ran}), so heavy tests ran at "
            "once: --dist loadgroup did not group them (pytest 9.2 with pytest-xdist 3.8.0 does not, pytest-xdist#1386); "
            "run them in one process, as make test does, or alone: pytest -m integration", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def _lane_order(item: pytest.Item) -> tuple[int, int]:
    """Integration tests before the others, and the memory-hungriest of them first (see above)."""
    integration = item.get_closest_marker("integration") is not None
    first = item.nodeid.split("::")[0] in FIRST_IN_THE_INTEGRATION_LANE
    return (0 if integration else 1, 0 if first else 1)


def _uses_the_sessions(item: pytest.Item, name: str) -> bool:
    """Whether ``item`` uses this file's fixture ``name`` (a module may define its own, e.g. a gateway over a fake vLLM)."""
    info = getattr(item, "_fixtureinfo", None)
    definitions = info.name2fixturedefs.get(name) if info is not None else None
    return bool(definitions) and definitions[-1].func.__module__ == __name__


@pytest.fixture(scope="session", autouse=True)
def no_vllm_without_integration(request):
    """Under ``-m "not integration"`` (``make test-fast``), starting a vLLM fails the test that tries: the fast lane
    starts none."""
    if not _runs_without_integration(request.config):
        yield
        return
    from lightning_core.serving import vllm

    real = vllm.start_process

    def refuse(name, argv, **kwargs):
        # a real vLLM: its own environment's interpreter (a test may stand a fake script in for it, which is cheap)
        if Path(str(argv[0])).absolute() == vllm.DEFAULT_VLLM_PYTHON.absolute():
            raise AssertionError(f"a test outside the integration mark started {name} ({' '.join(map(str, argv[:4]))} "
                                 "...): mark it @pytest.mark.integration")
        return real(name, argv, **kwargs)

    vllm.start_process = refuse
    yield
    vllm.start_process = real


def make_config(tmp: Path, *overrides: str) -> ArclightConfig:
    """A config rooted at ``tmp`` with free ports, plus ``overrides``."""
    return load_config(
        None,
        overrides=[f"project_dir={tmp}", f"collector.port={free_port()}", f"gateway.port={free_port()}", *overrides],
    )


@pytest.fixture(scope="session")
def prefect_harness():
    """A Prefect API server (Prefect's own test harness) for the session's flow runs: started once (9-15 s here), not
    once per module; no test stops or reconfigures it (tests/test_deployments.py runs its own server and worker)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.fixture(scope="session")
def main_job(tmp_path_factory):
    """`arclight train` of the calc example as `make train` runs it, once per session (tests/test_main_job.py checks
    the run, tests/test_traces.py its MLflow traces)."""
    from tests.test_main_job import run_main_job

    return run_main_job(tmp_path_factory.mktemp("main-job"))


@pytest.fixture(scope="session")
def collector_config(tmp_path_factory) -> ArclightConfig:
    """Config of the session's shared collector (its own lake)."""
    cfg = make_config(tmp_path_factory.mktemp("collector"), "collector.compact_idle_s=3600")
    Catalog.from_config(cfg).ensure()
    return cfg


@pytest.fixture(scope="session")
def collector(collector_config) -> Service:
    """A real ``arclight collector`` process for the whole session."""
    service = start_collector(collector_config, timeout_s=60)
    yield service
    service.stop()


# --- Serving (issue 4): a tiny model, a real vLLM CPU server with LoRA, the gateway in front ----


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama (6.6M parameters) with SmolLM2's tokenizer, saved as safetensors."""
    from lightning_core.common.model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama", seed=0)


@pytest.fixture(scope="session")
def serving_config(tmp_path_factory, tiny_model_dir, collector_config) -> ArclightConfig:
    """Config that serves the tiny model (fp32, small context) and records to the session collector.

    A tool-call parser lets agents name the tool the model must call (an Agents SDK handoff); the
    pythonic one needs no special tokens in the tokenizer."""
    return make_config(
        tmp_path_factory.mktemp("serving"),
        f"model.path={tiny_model_dir}", "model.served_name=tiny",
        "serving.port=0", "serving.dtype=float32", "serving.max_model_len=1024", "serving.max_lora_rank=16",
        "serving.redeploy=lora",  # the session server also serves the adapter tests
        "serving.extra_args=[--enable-auto-tool-choice, --tool-call-parser, pythonic]",
        f"collector.endpoint={collector_config.collector.url}",
    )


@pytest.fixture(scope="session")
def vllm_server(serving_config) -> Service:
    """A real vLLM (CPU build) serving the tiny model with runtime LoRA loading enabled."""
    from lightning_core.serving.vllm import start_vllm

    service = start_vllm(serving_config)
    yield service
    service.stop()


@pytest.fixture(scope="session")
def gateway(serving_config, vllm_server, collector) -> Service:
    """A real ``arclight gateway`` process in front of ``vllm_server``, recording spans to ``collector``."""
    from lightning_core.serving.vllm import start_gateway

    service = start_gateway(serving_config, upstreams=[vllm_server.url], collector_url=collector.url)
    yield service
    service.stop()


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A real S3-compatible server (moto's) with a bucket; credentials in the environment, as on a real host."""
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "wb") as out:
        server = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-p", str(port)],
                                  stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            httpx.get(url, timeout=1)
            break
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"moto_server did not start: {log.read_text()[-2000:]}")
            time.sleep(0.1)
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import boto3

    boto3.client("s3", endpoint_url=url, region_name="us-east-1").create_bucket(Bucket="arclight")
    yield url
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    os.killpg(server.pid, signal.SIGTERM)
    server.wait(timeout=10)
