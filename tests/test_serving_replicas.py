"""Two real vLLM (CPU) replicas behind one gateway of two processes: sticky rollouts, a redeploy that reaches
both, a replica that dies while rollouts are running, a redeploy while it is down, and its restart."""

from __future__ import annotations

import collections
import json

import httpx
import pytest
from openai import OpenAI

from lightning_core.epoch.context import RunContext
from lightning_core import semconv
from lightning_core.store.catalog import Catalog
from lightning_core.serving.client import GatewayClient
from lightning_core.serving.redeploy import deploy_adapter, restore_adapter
from lightning_core.serving.vllm import start_gateway, start_vllm
from lightning_core.common.services import free_port
from lightning_core.epoch.stack import Stack
from lightning_core.epoch.deploy import revive_replicas
from tests.conftest import make_config
from tests.test_redeploy import PROMPT, TARGET, greedy, served_models, train_overfit_adapter

pytestmark = pytest.mark.integration

POLICY = "two-replicas"
RUN = "two-replicas"


@pytest.fixture(scope="module")
def second_replica(serving_config):
    """A second vLLM of the same tiny model, on its own port; the test kills it."""
    service = start_vllm(serving_config, port=free_port(), name="vllm-b")
    yield service
    service.stop()


@pytest.fixture(scope="module")
def two_replica_gateway(tmp_path_factory, serving_config, vllm_server, second_replica, collector):
    cfg = make_config(tmp_path_factory.mktemp("two-replicas"), "gateway.workers=2", "model.served_name=tiny",
                      f"collector.endpoint={collector.url}")
    service = start_gateway(cfg, upstreams=[vllm_server.url, second_replica.url], collector_url=collector.url)
    yield service
    service.stop()


def _spans(collector_config, epoch: int) -> list[tuple[str, str, str]]:
    with Catalog.from_config(collector_config).read() as con:
        return con.execute(f"""SELECT rollout_id, json_extract_string(attributes, '$."{semconv.LLM_REPLICA}"'),
                                      json_extract_string(attributes, '$."{semconv.SERVED_MODEL}"')
                               FROM spans WHERE run_id = ? AND epoch = ?""", [RUN, epoch]).fetchall()


def _rollouts(admin: GatewayClient, epoch: int, n: int) -> dict[str, OpenAI]:
    return {f"{RUN}-{epoch}-{i}": OpenAI(base_url=admin.register_rollout(rollout_id=f"{RUN}-{epoch}-{i}", run_id=RUN, epoch=epoch),
                                         api_key="x", max_retries=0) for i in range(n)}


def test_two_replicas_stickiness_redeploy_to_both_one_dying_redeploy_without_it_and_its_restart(
    two_replica_gateway, vllm_server, second_replica, collector, collector_config, serving_config, tiny_model_dir, tmp_path
):
    a, b = vllm_server.url, second_replica.url
    admin = GatewayClient(two_replica_gateway.url, token=two_replica_gateway.token)

    # stickiness: every call of a rollout goes to one replica, and the rollouts use both
    clients = _rollouts(admin, 0, 16)  # 16: all on one replica has odds 2^-15 (8 failed once, random ports)
    for _ in range(3):
        for client in clients.values():
            client.chat.completions.create(model="tiny", messages=PROMPT, max_tokens=4, temperature=1.0)
    assert admin.flush()
    by_rollout = collections.defaultdict(set)
    for rollout, replica, _ in _spans(collector_config, 0):
        by_rollout[rollout].add(replica)
    assert set(by_rollout) == set(clients) and all(len(r) == 1 for r in by_rollout.values())
    assert {next(iter(r)) for r in by_rollout.values()} == {a, b}

    # a redeploy reaches both replicas, and rollouts on either are answered by the new version
    adapter = train_overfit_adapter(tiny_model_dir, tmp_path / "adapter")
    done = deploy_adapter(gateway=admin, replicas=[a, b], policy=POLICY, adapter_dir=adapter, keep_versions=2)
    deployed, revived = [done.served_model], None
    try:
        assert all(done.served_model in served_models(url) for url in (a, b))
        clients = _rollouts(admin, 1, 16)
        assert all(greedy(client, POLICY).startswith(TARGET) for client in clients.values())
        assert admin.flush()
        spans = _spans(collector_config, 1)
        assert {model for *_, model in spans} == {done.served_model} and {replica for _, replica, _ in spans} == {a, b}

        # replica b dies mid-epoch: the rollouts that stuck to it go on on a, with no failed call
        assert any(replica == b for _, replica, _ in spans)  # some of these rollouts are on b
        second_replica.process.kill()
        second_replica.process.wait(30)
        for client in clients.values():
            for _ in range(2):
                assert greedy(client, POLICY).startswith(TARGET)
        assert admin.flush()
        added = collections.Counter(replica for _, replica, _ in _spans(collector_config, 1))
        added.subtract(collections.Counter(replica for _, replica, _ in spans))
        assert +added == {a: 2 * len(clients)}
        r = httpx.get(f"{two_replica_gateway.url}/metrics")
        assert r.status_code == 200

        # a redeploy while b is down goes on without it: loaded and verified on a, switched, b reported skipped
        again = deploy_adapter(gateway=admin, replicas=[a, b], policy=POLICY, adapter_dir=adapter, keep_versions=2)
        deployed.append(again.served_model)
        assert (again.version, again.skipped) == (2, [b])
        assert all(greedy(client, POLICY).startswith(TARGET) for client in clients.values())  # still their v1, on a
        assert admin.flush()
        assert {model for *_, model in _spans(collector_config, 1)} == {done.served_model}  # pinned at registration
        clients = _rollouts(admin, 2, 16)  # rollouts registered from now on are pinned to v2

        # the redeploy stage restarts a replica it started that died; back up, b has no adapter yet, and the
        # calls of its rollouts fall over to a ("does not exist" from b) instead of failing
        stack = Stack(collector=collector, replicas=[vllm_server, second_replica])
        assert [r.url for r in revive_replicas(RunContext.of(serving_config, stack))] == [b]
        revived = stack.replicas[1]
        assert revived.alive() and again.served_model not in served_models(b)
        assert admin.flush()
        seen = _spans(collector_config, 2)
        assert all(greedy(client, POLICY).startswith(TARGET) for client in clients.values())
        assert admin.flush()
        assert +_added(_spans(collector_config, 2), seen) == {a: len(clients)}

        # loading the serving version onto it (what the stage does next) brings b's rollouts back to b
        assert restore_adapter(replicas=[a, b], policy=POLICY, adapter_dir=adapter, version=2) == [b]
        seen = _spans(collector_config, 2)
        assert all(greedy(client, POLICY).startswith(TARGET) for client in clients.values())
        assert admin.flush()
        back = +_added(_spans(collector_config, 2), seen)
        assert set(back) == {a, b} and sum(back.values()) == len(clients)
    finally:
        for version in deployed:
            httpx.post(f"{a}/v1/unload_lora_adapter", json={"lora_name": version}, timeout=30)
        if revived is not None:
            revived.stop()
    assert admin.policies()["policies"][POLICY]["version"] == 2


def _added(spans: list[tuple[str, str, str]], before: list[tuple[str, str, str]]) -> collections.Counter:
    """Spans per replica recorded since ``before`` was read."""
    added = collections.Counter(replica for _, replica, _ in spans)
    added.subtract(collections.Counter(replica for _, replica, _ in before))
    return added
