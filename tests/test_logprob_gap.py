"""Do vLLM and the trainer agree on the policy (issue 56)? A tiny model served in bf16 and trained in fp32: the
logprobs vLLM recorded differ from the trainer's even on the first micro-batch of an on-policy step, so PPO's ratio
against them is not 1 and clipping drops tokens. The default correction (decoupled) takes its ratio against the
trainer's own logprobs, 1 there by construction; vLLM's enter as the behaviour weight, which is then not 1, and which
fp32 serving leaves at 1 (issue 68)."""

from __future__ import annotations

import json

import pytest

from lightning_core.config import load_config
from lightning_core.trainer.train import behaviour_correction
from tests.conftest import make_config

pytestmark = pytest.mark.integration

# a tight clip and cap, so that the tiny model's bf16 rounding shows as clipped tokens and capped weights
TIGHT = ["trainer.epsilon_low=0.01", "trainer.epsilon_high=0.01", "trainer.importance_cap=1.01"]


@pytest.fixture(scope="module")
def bf16_vllm(tmp_path_factory, tiny_model_dir):
    """The session's tiny model served by a vLLM of its own in bfloat16 (the session's serves float32)."""
    from lightning_core.serving.vllm import start_vllm

    cfg = make_config(tmp_path_factory.mktemp("bf16"), f"model.path={tiny_model_dir}", "model.served_name=tiny",
                      "serving.port=0", "serving.dtype=bfloat16", "serving.max_model_len=1024", "serving.redeploy=lora")
    service = start_vllm(cfg)
    yield service
    service.stop()


def _sampled(url: str, *, seed: int) -> list[dict]:
    """Two groups of four rollouts whose responses vLLM sampled (temperature 1), each with the logprobs vLLM recorded
    for its tokens, as the gateway records them: on-policy triplets of the version vLLM serves (the base model)."""
    import httpx

    from tests.tiny_llama import make_triplets

    rows = make_triplets(groups=2, per_group=4, rewarded=0, seed=seed, prompt_len=12)
    for i, row in enumerate(rows):
        response = httpx.post(f"{url}/v1/completions", timeout=60, json={
            "model": "tiny", "prompt": row["prompt_token_ids"], "max_tokens": 12, "temperature": 1.0, "seed": seed + i,
            "logprobs": 0, "return_tokens_as_token_ids": True, "ignore_eos": True})
        response.raise_for_status()
        logprobs = response.json()["choices"][0]["logprobs"]
        row["response_token_ids"] = [int(t.removeprefix("token_id:")) for t in logprobs["tokens"]]
        row["response_logprobs"] = logprobs["token_logprobs"]
    return rows


def _first_step(tmp_path, tiny_model_dir, rows: list[dict], *, dtype: str, run: str, extra=()) -> dict:
    """One epoch of GRPO on ``rows`` by the trainer (fp32 on this CPU) of a config whose vLLM serves in ``dtype``:
    the gap, the clipped share at its first step, what ppo clipped or would have, the behaviour weight (decoupled),
    and the correction it used."""
    from lightning_core.trainer.train import train_policies
    from tests.tiny_llama import triplet_table

    cfg = make_config(tmp_path / run, f"model.path={tiny_model_dir}", "model.served_name=tiny", f"run_name={run}",
                      f"serving.dtype={dtype}", "trainer.device=cpu", "trainer.micro_batch_size=8", "trainer.lora_r=4",
                      "trainer.lora_alpha=8", *TIGHT, *extra)
    [result] = train_policies(cfg, run_id=run, epoch=0, base_model_dir=tiny_model_dir,
                              triplets={"default": triplet_table([{**r, "run_id": run} for r in rows])})
    m = result.metrics
    return {"gap_mean": m["logprob_gap/epoch_start_mean"], "gap_max": m["logprob_gap/epoch_start_max"],
            "clipped": m["clip_ratio/epoch_start"], "ppo_clipped": m["clip_ratio/epoch_start_ppo_equivalent"],
            "capped": m.get("behaviour_weight/epoch_start_capped"), "weight": m.get("behaviour_weight/epoch_start_mean"),
            "correction": m["behaviour_correction"]}


def test_bf16_serving_and_fp32_training_disagree_on_policy_and_the_default_corrects_with_a_behaviour_weight_off_1(
        tmp_path, bf16_vllm, vllm_server, tiny_model_dir):
    fp32 = _first_step(tmp_path, tiny_model_dir, _sampled(vllm_server.url, seed=0), dtype="float32", run="gap-fp32")
    bf16_rows = _sampled(bf16_vllm.url, seed=0)
    ppo = _first_step(tmp_path, tiny_model_dir, bf16_rows, dtype="bfloat16", run="gap-bf16-ppo",
                      extra=["trainer.behaviour_correction=ppo"])
    default = _first_step(tmp_path, tiny_model_dir, bf16_rows, dtype="bfloat16", run="gap-bf16-auto")
    print(json.dumps({"fp32 default": fp32, "bf16 ppo": ppo, "bf16 default": default}))
    # fp32 against fp32: the same numbers up to summation order, so the behaviour weight is 1 and ppo would clip
    # nothing (the level to reach)
    assert fp32["correction"] == "decoupled" and fp32["gap_mean"] < 1e-4
    assert fp32["weight"] == pytest.approx(1.0, abs=1e-4) and fp32["capped"] == 0.0 and fp32["ppo_clipped"] == 0.0
    # bf16 against fp32, on the first micro-batch of an on-policy step: the ratio is not 1, and ppo clips for it
    assert ppo["correction"] == "ppo" and ppo["gap_mean"] > 20 * max(fp32["gap_mean"], 1e-6)
    assert ppo["clipped"] > 0.05 and ppo["ppo_clipped"] == pytest.approx(ppo["clipped"], abs=0.05)
    # the default: its ratio is 1 here by construction, so it reports no clipped share; the behaviour weight carries
    # the gap (off 1, often past the cap), and what ppo would have clipped is what ppo did on the same samples
    assert default["correction"] == "decoupled" and default["gap_mean"] == pytest.approx(ppo["gap_mean"])
    assert default["clipped"] != default["clipped"]  # NaN: not reported
    assert default["capped"] > 0.05 and abs(default["weight"] - 1) > 1e-3
    assert default["ppo_clipped"] == pytest.approx(ppo["ppo_clipped"])


def test_auto_chooses_the_correction_from_how_vllm_and_the_trainer_compute(tmp_path):
    def choice(*overrides: str) -> tuple[str, str]:
        cfg = load_config(None, overrides=[f"project_dir={tmp_path}", "trainer.device=cpu", *overrides])
        return behaviour_correction(cfg, cfg.trainer_for("default"))

    # auto is decoupled in every case; what differs is the reason recorded with the version
    assert choice("serving.dtype=bfloat16") == ("decoupled", "vLLM computes bfloat16 on cpu, the trainer float32 on cpu")
    assert choice("serving.dtype=float32", "trainer.dtype=bfloat16") == (
        "decoupled", "vLLM computes float32 on cpu, the trainer bfloat16 autocast on cpu")
    assert choice("serving.dtype=float32", "trainer.max_staleness=1") == (
        "decoupled", "epochs overlap (trainer.max_staleness = 1)")
    used, why = choice("serving.urls=['http://127.0.0.1:9']")  # attached, numerics unknown
    assert used == "decoupled" and "serving.dtype does not say how it computes" in why
    for same in (["serving.dtype=float32"], ["serving.urls=['http://127.0.0.1:9']", "serving.dtype=float32"]):
        used, why = choice(*same)  # both fp32 on a CPU: decoupled all the same (it learned no worse there)
        assert used == "decoupled" and why.startswith("vLLM and the trainer both compute float32 on cpu; decoupled")
    assert choice("serving.dtype=bfloat16", "trainer.behaviour_correction=ppo") == (
        "ppo", "set by trainer.behaviour_correction")
