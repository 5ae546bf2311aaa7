"""Pure stage helpers: how versions reach vLLM, version numbers, planning and resume bookkeeping."""

from __future__ import annotations

import contextlib
import json
import shutil
import threading
import time

import pytest

from lightning_core.epoch import bookkeeping as ep
from lightning_core.rollouts import dataset
from lightning_core.store.catalog import Catalog
from lightning_core.config import load_config
from lightning_core.rollouts.runner import RolloutOutcome
from lightning_core.serving.vllm import redeploy_mode
from lightning_core.trainer.versions import version_number


def test_auto_redeploy_merges_on_cpu_and_groups_replicas_when_an_agent_stays_frozen(monkeypatch):
    from lightning_core.serving.vllm import replica_groups, start_vllm_replicas
    from lightning_core.common.services import ServiceError

    monkeypatch.setattr(shutil, "which", lambda name: None)  # no GPU on this machine
    one = load_config(None)
    assert redeploy_mode(one) == "merged" and replica_groups(one) == [None]  # one policy, every agent: weights replaced
    frozen = load_config(None, overrides=["policies=[{name: p, agent_match: 'writer|rewriter'}]", "model.served_name=base"])
    # a frozen checker calling the base model keeps base weights: its own vLLM; the policy's merged weights in another
    assert redeploy_mode(frozen) == "merged" and replica_groups(frozen) == ["p", "base"]
    two = load_config(None, overrides=["policies=[{name: a}, {name: b}]", "model.served_name=base"])
    assert redeploy_mode(two) == "merged" and replica_groups(two) == ["a", "b", "base"]
    three = load_config(None, overrides=["policies=[{name: a}, {name: b}, {name: c}]"])
    assert redeploy_mode(three) == "lora" and replica_groups(three) == [None]  # a vLLM per policy is too much memory
    with pytest.raises(ValueError, match="rename the policy"):
        replica_groups(load_config(None, overrides=["policies=[{name: base, agent_match: w}]", "model.served_name=base"]))
    attached = load_config(None, overrides=["policies=[{name: p, agent_match: w}]", "serving.urls=['http://127.0.0.1:9']"])
    with pytest.raises(ServiceError, match="serving.redeploy: lora"):
        start_vllm_replicas(attached)  # attached servers cannot be grouped: refused, not silently mis-served
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    assert redeploy_mode(load_config(None)) == "lora" and replica_groups(frozen) == [None]


def test_merged_weight_folders_beyond_keep_versions_are_deleted(tmp_path):
    import os

    from lightning_core.common.host_weights import prune_versions

    policy = tmp_path / "checkpoints" / "calc"
    for n in range(1, 6):
        (policy / f"calc-v{n}").mkdir(parents=True)  # the adapters: never touched
        merged = policy / f"calc-v{n}.merged"
        merged.mkdir()
        (merged / "model.safetensors").write_bytes(b"w")
        os.utime(merged, (1_000_000 + n, 1_000_000 + n))
    removed = prune_versions(policy, keep=2, current="calc-v5", only=".merged")  # as deploy.py prunes the control host
    assert sorted(p.name for p in removed) == ["calc-v1.merged", "calc-v2.merged", "calc-v3.merged"]
    assert sorted(p.name for p in policy.iterdir()) == [
        "calc-v1", "calc-v2", "calc-v3", "calc-v4", "calc-v4.merged", "calc-v5", "calc-v5.merged"]
    assert prune_versions(policy, keep=1, current="calc-v5", only=".merged") == [policy / "calc-v4.merged"]
    assert (policy / "calc-v5.merged" / "model.safetensors").is_file()


def test_version_numbers_come_from_version_ids():
    assert version_number("calc-v12") == 12
    with pytest.raises(ValueError, match="<policy>-v<N>"):
        version_number("calc")


def test_planning_is_seeded_idempotent_and_resume_lists_only_unfinished(tmp_path):
    dataset = tmp_path / "tasks.jsonl"
    dataset.write_text("".join(json.dumps({"q": i}) + "\n" for i in range(10)))
    cfg = load_config(None, overrides=[f"project_dir={tmp_path}", f"rollouts.dataset={dataset}",
                                       "rollouts.tasks_per_epoch=3", "rollouts.group_size=2", "run_name=plan"])
    catalog = Catalog.from_config(cfg)
    catalog.ensure()
    first = ep.plan_epoch(cfg, catalog, run_id="plan", epoch=0)
    assert len(first) == 6 and len({s.task_id for s in first}) == 3
    assert ep.plan_epoch(cfg, catalog, run_id="plan", epoch=0) == first  # planned once
    assert {s.task_id for s in ep.plan_epoch(cfg, catalog, run_id="plan", epoch=1)} != {s.task_id for s in first}
    ep.record_outcome(catalog, RolloutOutcome(first[0].rollout_id, "succeeded", 0, 1.0, None, 1.0, 2.0))
    pending = ep.pending_rollouts(catalog, run_id="plan", epoch=0)
    assert [s.rollout_id for s in pending] == [s.rollout_id for s in first[1:]]
    assert ep.rollout_counts(catalog, run_id="plan", epoch=0) == {"succeeded": 1, "planned": 5}


def test_epoch_status_advances_and_next_epoch_resumes_an_unfinished_one(tmp_path):
    cfg = load_config(None, overrides=[f"project_dir={tmp_path}"])
    catalog = Catalog.from_config(cfg)
    catalog.ensure()
    assert ep.next_epoch(catalog, run_id="r") == 0
    ep.set_epoch_status(catalog, run_id="r", epoch=0, status="completed")
    ep.set_epoch_status(catalog, run_id="r", epoch=1, status="triplets_done", stats={"spans": 3})
    assert ep.next_epoch(catalog, run_id="r") == 1  # the interrupted epoch comes first
    assert ep.reached("triplets_done", "ingested") and not ep.reached("triplets_done", "trained")
    with pytest.raises(ValueError, match="must be one of"):
        ep.set_epoch_status(catalog, run_id="r", epoch=1, status="done")


def test_the_config_a_run_records_in_the_catalog_hides_its_tokens_and_storage_keys(tmp_path):
    """Analysts query the runs table (and share what they find): the config recorded there keeps its settings but not
    the values of the tokens and the storage options."""
    cfg = load_config(None, overrides=[f"project_dir={tmp_path}", "run_name=hidden", "gateway.token=SECRET-gw-71aa",
                                       "collector.token=SECRET-col-03be",
                                       'lake.storage_options={"AWS_SECRET_ACCESS_KEY": "SECRET-aws-c4d2"}'])
    catalog = Catalog.from_config(cfg)
    catalog.ensure()
    ep.ensure_run(catalog, cfg)
    with catalog.read(spans=False) as con:
        recorded = json.loads(con.execute("SELECT config FROM runs WHERE run_id = 'hidden'").fetchall()[0][0])
    assert "SECRET-" not in json.dumps(recorded)
    assert (recorded["gateway"]["token"], recorded["collector"]["token"], recorded["lake"]["storage_options"]) == (
        "***", "***", "***")
    assert recorded["gateway"]["port"] == cfg.gateway.port and recorded["run_name"] == "hidden"


def test_bad_datasets_name_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a"}\nnot json\n')
    with pytest.raises(dataset.DatasetError, match=r"bad.jsonl:2: not valid JSON"):
        dataset.load_tasks(bad)
    dup = tmp_path / "dup.jsonl"
    dup.write_text('{"id": "a"}\n{"id": "a"}\n')
    with pytest.raises(dataset.DatasetError, match="duplicate task id 'a'"):
        dataset.load_tasks(dup)
    with pytest.raises(dataset.DatasetError, match="not found"):
        dataset.load_tasks(tmp_path / "missing.jsonl")


@contextlib.contextmanager
def _served(app):
    """Serve a real app (the gateway's) on a free loopback port in this process, for a test that needs no vLLM."""
    import uvicorn

    from lightning_core.common.services import free_port

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the gateway app did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def test_a_registration_refused_for_a_setting_names_the_setting_instead_of_asking_for_a_report():
    """A wrong token, a gateway of another config, an endpoint that is no gateway: each 4xx says which setting fixes
    it; only a refusal no setting explains (a 422) still asks for a report with the task's id."""
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from lightning_core.epoch.failures import RunStopped
    from lightning_core.epoch.stages import run_one_rollout
    from lightning_core.rollouts.runner import RolloutSpec, RunnerSettings
    from lightning_core.serving.app import build_app
    from lightning_core.serving.client import GatewayAdminError, GatewayClient

    def gateway(token: str | None):
        return build_app(upstreams=["http://127.0.0.1:9"], base_model="base", policies=["calc"], token=token,
                         exporter=InMemorySpanExporter())

    def refusal(url: str, *, token: str | None, rollout_id: str = "r-0") -> str:
        settings = RunnerSettings(agent="tests.helpers.flow_agent:run", collector_url="http://127.0.0.1:9",
                                  gateway_url=url, model="calc", gateway_token=token, retries=0)
        with pytest.raises(RunStopped) as stopped:
            run_one_rollout(settings, RolloutSpec("r", 0, rollout_id, "task-7", "g", 0, {"question": "hi"}))
        return str(stopped.value)

    with _served(gateway("right")) as url, _served(gateway(None)) as open_url:
        wrong_token = refusal(url, token="wrong")
        not_a_gateway = refusal(f"{url}/elsewhere", token="right")
        invalid = refusal(url, token="right", rollout_id="not a valid/rollout id")
        with pytest.raises(GatewayAdminError) as unknown:  # what the gateway answers for a policy it does not serve
            GatewayClient(url, token="right").register_rollout(rollout_id="r-1", policy="other")
        client = GatewayClient(open_url)
        client.http.headers["Host"] = "arclight.example"  # a token-less gateway reached by a name, not loopback
        with pytest.raises(GatewayAdminError) as forbidden:
            client.register_rollout(rollout_id="r-2")
    assert "answered 401" in wrong_token and "set gateway.token (or ARCLIGHT_GATEWAY_TOKEN)" in wrong_token, wrong_token
    assert "answered 404" in not_a_gateway and f"gateway.endpoint ({url}/elsewhere) is not an Arclight gateway" in \
        not_a_gateway, not_a_gateway
    from lightning_core.epoch.stages import refused_registration

    policy = refused_registration(unknown.value, gateway_url=url, policies=["other"])
    assert "answered 400" in policy and "the config's policies (other)" in policy and "gateway.endpoint" in policy, policy
    host = refused_registration(forbidden.value, gateway_url=open_url, policies=["calc"])
    assert "answered 403" in host and "gateway.token" in host, host
    assert all("report this" not in m for m in (wrong_token, not_a_gateway, policy, host))
    assert "answered 422" in invalid and "report this with the task's id" in invalid, invalid
