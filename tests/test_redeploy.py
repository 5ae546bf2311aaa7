"""Hot redeploy of a freshly trained LoRA adapter into a real vLLM (CPU), behind the real gateway."""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from lightning_core import semconv
from lightning_core.serving.client import GatewayClient
from lightning_core.common.http_guard import bearer
from lightning_core.common.model import load_tokenizer
from lightning_core.serving.redeploy import RedeployError, deploy_adapter

pytestmark = pytest.mark.integration

PROMPT = [{"role": "user", "content": "Say hi."}]
TARGET = "Arclight learns fast."
POLICY = "redeploy-test"  # its own policy, so the session's other gateway users keep the base model


def train_overfit_adapter(model_dir: Path, out_dir: Path, *, steps: int = 20, seed: int = 0) -> Path:
    """Train a LoRA adapter with peft until greedy decoding answers PROMPT with TARGET; return its folder."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    tokenizer = load_tokenizer(model_dir)
    prompt_ids = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=True, return_dict=False)
    target_ids = tokenizer.encode(TARGET)  # no EOS: it shares a tied embedding row with <|im_end|> and slows overfitting
    input_ids = torch.tensor([prompt_ids + target_ids])
    labels = torch.tensor([[-100] * len(prompt_ids) + target_ids])
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(model, lora)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        out = model(input_ids=input_ids, labels=labels)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    predicted = out.logits[0, len(prompt_ids) - 1 : -1].argmax(-1).tolist()
    assert predicted == target_ids, f"adapter did not overfit (loss {out.loss.item():.3f}): {predicted} != {target_ids}"
    model.save_pretrained(str(out_dir))
    return out_dir


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory) -> Path:
    return train_overfit_adapter(tiny_model_dir, tmp_path_factory.mktemp("adapters") / "overfit")


def greedy(client: OpenAI, model: str) -> str:
    response = client.chat.completions.create(model=model, messages=PROMPT, max_tokens=12, temperature=0)
    return response.choices[0].message.content


def served_models(url: str) -> set[str]:
    return {m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]}


def test_hot_redeploy_changes_outputs_without_restart_and_rejects_a_corrupt_adapter(
    gateway, vllm_server, adapter_dir, collector_config, tmp_path
):
    admin = GatewayClient(gateway.url, token=gateway.token)
    client = OpenAI(base_url=admin.register_rollout(rollout_id="redeploy-1", run_id="redeploy-test", epoch=0),
                    api_key="x", max_retries=0)
    pid = vllm_server.process.pid
    before = greedy(client, POLICY)
    assert TARGET not in before

    done = deploy_adapter(gateway=admin, replicas=[vllm_server.url], policy=POLICY, adapter_dir=adapter_dir, keep_versions=2)
    assert (done.version, done.served_model) == (1, f"{POLICY}-v1")
    # the new version answered a real request before the switch, with the adapter's words: what the deploy did, not
    # how fast (benchmarks/serving_bench.py measures that: < 2 s on an idle machine)
    assert done.verify_text and TARGET.startswith(done.verify_text), done.verify_text
    assert greedy(client, POLICY).startswith(TARGET)
    assert vllm_server.process.pid == pid and vllm_server.process.poll() is None

    # The span of a call to the new version names the served adapter and its version.
    response = client.chat.completions.create(model=POLICY, messages=PROMPT, max_tokens=4, temperature=0)
    assert admin.flush()
    from tests.test_gateway import gateway_spans

    [span] = gateway_spans(collector_config, admin, response.id)
    assert span["attributes"][semconv.SERVED_MODEL] == f"{POLICY}-v1"
    assert span["attributes"][semconv.POLICY_VERSION] == 1
    assert span["attributes"][semconv.POLICY_NAME] == POLICY

    # A corrupt adapter is refused; version 1 keeps serving.
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "adapter_config.json").write_text((adapter_dir / "adapter_config.json").read_text())
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x00" * 64 + b"not a safetensors file")
    with pytest.raises(RedeployError, match="refused adapter"):
        deploy_adapter(gateway=admin, replicas=[vllm_server.url], policy=POLICY, adapter_dir=corrupt)
    assert admin.policies()["policies"][POLICY]["served_model"] == f"{POLICY}-v1"
    assert greedy(client, POLICY).startswith(TARGET)
    assert f"{POLICY}-v2" not in served_models(vllm_server.url)

    # Two more versions: keep_versions=2 keeps current + previous loaded and unloads the rest.
    deploy_adapter(gateway=admin, replicas=[vllm_server.url], policy=POLICY, adapter_dir=adapter_dir, keep_versions=2)
    v3 = deploy_adapter(gateway=admin, replicas=[vllm_server.url], policy=POLICY, adapter_dir=adapter_dir, keep_versions=2)
    assert v3.version == 3 and v3.unloaded == [f"{POLICY}-v1"]
    loaded = served_models(vllm_server.url)
    assert {f"{POLICY}-v2", f"{POLICY}-v3"} <= loaded and f"{POLICY}-v1" not in loaded

    # Rollback switches the gateway back to the previous version, still loaded.
    state = admin.rollback(POLICY)
    assert (state["served_model"], state["version"]) == (f"{POLICY}-v2", 2)
    assert greedy(client, POLICY).startswith(TARGET)
    assert greedy(client, "tiny") == before  # the base model is untouched
    assert vllm_server.process.pid == pid


def test_a_version_name_another_project_left_loaded_from_its_own_folder_is_replaced_by_ours(
    gateway, vllm_server, adapter_dir, tmp_path
):
    """Two projects with a policy of one name on one attached vLLM both make `<policy>-v1`. The second must serve its
    own weights, not the first's (and not a folder the first may have deleted, which vLLM reads again on a reload)."""
    import shutil

    from safetensors.torch import load_file, save_file

    policy = "redeploy-foreign"
    foreign = tmp_path / "other-project" / f"{policy}-v1"
    shutil.copytree(adapter_dir, foreign)
    weights = load_file(str(foreign / "adapter_model.safetensors"))
    save_file({k: v.zero_() if "lora_B" in k else v for k, v in weights.items()}, str(foreign / "adapter_model.safetensors"))
    loaded = httpx.post(f"{vllm_server.url}/v1/load_lora_adapter",
                        json={"lora_name": f"{policy}-v1", "lora_path": str(foreign)}, timeout=120)
    assert loaded.status_code == 200, loaded.text

    admin = GatewayClient(gateway.url, token=gateway.token)
    client = OpenAI(base_url=admin.register_rollout(rollout_id="foreign-1", run_id="redeploy-test", epoch=0),
                    api_key="x", max_retries=0)
    assert not greedy(client, f"{policy}-v1").startswith(TARGET)  # the other project's weights (B = 0: the base)
    done = deploy_adapter(gateway=admin, replicas=[vllm_server.url], policy=policy, adapter_dir=adapter_dir)
    assert done.served_model == f"{policy}-v1"
    roots = {m["id"]: m.get("root") for m in httpx.get(f"{vllm_server.url}/v1/models").json()["data"]}
    assert Path(roots[f"{policy}-v1"]).resolve() == adapter_dir.resolve()
    assert greedy(client, policy).startswith(TARGET)
    httpx.post(f"{vllm_server.url}/v1/unload_lora_adapter", json={"lora_name": f"{policy}-v1"}, timeout=60)


def test_switch_to_an_adapter_that_is_not_loaded_is_refused(gateway):
    auth = bearer(gateway.token)
    r = httpx.put(f"{gateway.url}/admin/policies/default", json={"served_model": "never-loaded-v9", "version": 9}, headers=auth)
    assert r.status_code == 409 and "not loaded" in r.json()["error"]["message"]
    assert json.loads(httpx.get(f"{gateway.url}/admin/policies", headers=auth).text)["policies"]["default"]["served_model"] is None


def test_merged_redeploy_reloads_weights_in_place_and_resets_the_prefix_cache(gateway, vllm_server, adapter_dir, tiny_model_dir, tmp_path):
    from lightning_core.serving.redeploy import deploy_full_weights, merge_adapter

    policy = "merged-test"
    admin = GatewayClient(gateway.url, token=gateway.token)
    client = OpenAI(base_url=admin.register_rollout(rollout_id="merged-1", run_id="redeploy-test", epoch=0),
                    api_key="x", max_retries=0)
    pid = vllm_server.process.pid
    before = greedy(client, "tiny")
    assert TARGET not in before  # also warms the prefix cache with the base weights
    first_before = first_token(client, "tiny")
    merged = merge_adapter(base_model_dir=tiny_model_dir, adapter_dir=adapter_dir, out_dir=tmp_path / "v1.merged", dtype="float32")
    assert (merged / "model.safetensors").is_file() and (merged / "tokenizer.json").is_file()
    assert merge_adapter(base_model_dir=tiny_model_dir, adapter_dir=adapter_dir, out_dir=merged,
                         dtype="float32") == merged  # reused
    try:
        done = deploy_full_weights(gateway=admin, replicas=[vllm_server.url], policy=policy, model_dir=merged, version=1)
        assert (done.version, done.served_model) == (1, "tiny")
        assert greedy(client, policy).startswith(TARGET)  # same prompt as before: the stale prefix cache was reset
        assert admin.policies()["policies"][policy]["version"] == 1
        assert vllm_server.process.pid == pid
    finally:  # give the session's other tests their base weights back
        httpx.post(f"{vllm_server.url}/collective_rpc", timeout=300,
                   json={"method": "reload_weights", "kwargs": {"weights_path": str(tiny_model_dir)}}).raise_for_status()
        httpx.post(f"{vllm_server.url}/reset_prefix_cache", timeout=60).raise_for_status()
    assert TARGET not in greedy(client, "tiny")
    token, logprob = first_token(client, "tiny")  # later greedy tokens of a random model can flip on near-ties
    assert token == first_before[0] and abs(logprob - first_before[1]) < 1e-3


def first_token(client: OpenAI, model: str) -> tuple[str, float]:
    """Return the greedy first answer token and its logprob (identical weights give identical values)."""
    response = client.chat.completions.create(model=model, messages=PROMPT, max_tokens=1, temperature=0, logprobs=True)
    entry = response.choices[0].logprobs.content[0]
    return entry.token, entry.logprob


def test_a_call_to_a_version_its_replica_lost_is_our_failure_not_the_agents(gateway, vllm_server, adapter_dir,
                                                                             collector_config):
    # issue 51, finding 2: a replica restarted under a LoRA version serves the base model only; vLLM's 404 for the
    # missing adapter counted as the agent's failure
    import openai

    from lightning_core.rollouts.runner import INFRASTRUCTURE, failure_kind
    from lightning_core.store.catalog import Catalog

    policy = "lost-adapter"
    admin = GatewayClient(gateway.url, token=gateway.token)
    deploy_adapter(gateway=admin, replicas=[vllm_server.url], policy=policy, adapter_dir=adapter_dir)
    client = OpenAI(base_url=admin.register_rollout(rollout_id="lost-1", run_id="lost-adapter", epoch=0), api_key="x",
                    max_retries=0)
    assert greedy(client, policy).startswith(TARGET)
    httpx.post(f"{vllm_server.url}/v1/unload_lora_adapter", json={"lora_name": f"{policy}-v1"}).raise_for_status()
    with pytest.raises(openai.APIStatusError) as err:  # as after a restart: the replica serves no adapter
        greedy(client, policy)
    assert err.value.status_code == 503 and "does not serve lost-adapter-v1" in str(err.value)
    assert failure_kind(err.value, gateway.url) == INFRASTRUCTURE
    assert admin.flush()
    with Catalog.from_config(collector_config).read() as con:
        failed = con.execute("SELECT json_extract(attributes, '$.\"arclight.llm.upstream_failed\"')::BOOLEAN FROM spans "
                             "WHERE rollout_id = 'lost-1' AND status_code = 'ERROR'").fetchall()
    assert failed == [(True,)]  # the ingest barrier reads it: the rollout runs again (sql/arrivals.sql)


def test_a_replica_reloading_merged_weights_for_longer_than_stuck_after_s_is_not_restarted_as_stuck(
        collector, gateway, vllm_server, tiny_model_dir, tmp_path):
    """issue 68, finding 6: a reload of merged weights holds vLLM's engine (up to 600 s: a 7B model, slow storage), so
    its one-token probes go unanswered; the supervisor took that for a stuck engine after serving.stuck_after_s and
    stopped the replica halfway through the reload. Here a redeploy's reload is held twice as long as stuck_after_s
    (the session vLLM's engine processes stopped meanwhile, its API server up) under a supervisor that watches it."""
    import contextlib
    import signal
    import threading
    import time

    from lightning_core.epoch.context import RunContext
    from lightning_core.epoch.deploy import deploy_latest
    from lightning_core.epoch.stack import Stack
    from lightning_core.epoch.supervise import Supervisor
    from lightning_core.trainer.versions import record_version
    from tests.conftest import make_config

    policy = "slow-reload"
    cfg = make_config(tmp_path, f"model.path={tiny_model_dir}", "model.served_name=tiny", "serving.redeploy=merged",
                      "serving.stuck_after_s=3", f"policies={json.dumps([{'name': policy}])}")
    stack = Stack(collector=collector, replicas=[vllm_server], gateway=gateway)
    ctx = RunContext.of(cfg, stack)
    # a full checkpoint with the weights vLLM serves already, so that the session's other tests find them unchanged
    record_version(ctx.catalog, version=f"{policy}-v1", policy=policy, parent_version=None, run_id="slow-reload",
                   epoch=0, path=str(tiny_model_dir), metrics={}, kind="full", base_model=str(tiny_model_dir),
                   mlflow_run_id=None, registry_version=None)
    engine = [pid for pid in _group(vllm_server.process.pid) if pid != vllm_server.process.pid]
    held_s = 2 * cfg.serving.stuck_after_s + 2

    def hold() -> None:
        for pid in engine:
            os.kill(pid, signal.SIGSTOP)
        try:
            time.sleep(held_s)
        finally:
            for pid in engine:
                with contextlib.suppress(ProcessLookupError):  # stopped by a supervisor that took it for stuck
                    os.kill(pid, signal.SIGCONT)

    try:
        with Supervisor(ctx, interval_s=0.5):
            holder = threading.Thread(target=hold, daemon=True)
            started = time.monotonic()
            holder.start()
            [deployed] = deploy_latest(ctx)
            took = time.monotonic() - started
            holder.join()
    finally:  # the old code's supervisor started a vLLM of its own in the session's place
        for replica in stack.replicas:
            if replica is not vllm_server:
                replica.stop()
    assert engine and took >= held_s - 0.5, (engine, took)  # the reload waited for the engine
    assert deployed.version == f"{policy}-v1"
    assert stack.outages == [] and stack.replicas == [vllm_server] and vllm_server.process.poll() is None
    assert stack.reloading == {}  # the mark ends with the reload
    with stack.reloads([vllm_server.url], timeout_s=0.0):  # and lasts no longer than the reload's timeout
        assert not stack.is_reloading(vllm_server.url)


def _group(leader: int) -> list[int]:
    """The processes of ``leader``'s process group (vLLM's API server, its engine core and workers)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getpgid(int(entry.name)) == leader:
                    found.append(int(entry.name))
            except ProcessLookupError:
                pass
    return found
