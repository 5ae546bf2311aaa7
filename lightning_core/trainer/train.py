"""Train one policy on one epoch's triplets and publish the result as a new policy version.

triplets -> samples -> (GRPO steps | SFT) -> atomic checkpoint -> MLflow artifact + registry
-> catalog row -> 'latest' link. The catalog row is written after the checkpoint and its
registration, and 'latest' moves last, so nothing ever points at a version that is not complete.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import mlflow
import torch

from lightning_core import tracking
from lightning_core.store.catalog import Catalog
from lightning_core.config import ArclightConfig, TrainerConfig
from lightning_core.common import gpu, hardware, published
from lightning_core.common.durable import save_atomically
from lightning_core.trainer import checkpoint, versions
from lightning_core.trainer.batches import epoch_stats, make_samples, rows_of, within_staleness
from lightning_core.trainer.collectives import broadcast_parameters
from lightning_core.trainer.distributed import run_grpo_distributed
from lightning_core.trainer.grpo_run import OPTIMIZER_STATE, run_grpo, run_sft
from lightning_core.trainer.policy_model import autocast_dtype, load_policy_model, pick_device, seed_everything
from lightning_core.trainer.sft import select_sft_rows
from lightning_core.trainer.tree_attention import choose_attention

log = logging.getLogger(__name__)


# vLLM against the trainer at the epoch's first GRPO step, before any update (the numerics' gap alone, on-policy):
# the step metric -> the epoch's. The first step's micro-batches all see the parameters the epoch started from.
EPOCH_START = {"logprob_gap/mean": "logprob_gap/epoch_start_mean", "logprob_gap/max": "logprob_gap/epoch_start_max",
               "clip_ratio/first_micro_batch": "clip_ratio/epoch_start",  # ppo only
               "clip_ratio/ppo_equivalent": "clip_ratio/epoch_start_ppo_equivalent",
               "behaviour_weight/capped": "behaviour_weight/epoch_start_capped",  # decoupled only
               "behaviour_weight/mean": "behaviour_weight/epoch_start_mean"}


@dataclass
class TrainResult:
    """What one policy's training in one epoch produced (``version`` is None when nothing was trained)."""

    policy: str
    run_id: str
    epoch: int
    version: str | None
    parent_version: str | None
    path: Path | None
    metrics: dict[str, float]
    steps: list[dict[str, float]] = field(default_factory=list)
    mlflow_run_id: str | None = None
    registry_version: str | None = None
    message: str = ""


@dataclass(frozen=True)
class Rank:
    """This process's place among the ranks of one training spread over hosts; the process group is joined already."""

    rank: int
    world: int


@dataclass
class TrainJob:
    """The compute of one version as plain data, so that it can travel to a train host (``trainer.executor``): what to
    train from and with what settings; where the version goes is the config's (``trainer.output_dir``,
    ``serving.weights_uri``)."""

    config: ArclightConfig
    policy: str
    version: str
    run_id: str
    epoch: int
    cfg: TrainerConfig             # the policy's settings, learning rate scheduled; what depends on the machine (the
                                   # attention's backend, the behaviour correction) is resolved where it trains
    samples: list[Any]
    base_model_dir: str            # the weights to load: the base model, or a full-finetune parent's checkpoint
    parent_version: str | None
    parent_adapter_dir: str | None  # a LoRA parent's folder, where the flow's catalog says it is
    parent_state_dir: str | None   # where the parent's optimizer state is (default: the parent's folder)
    mlflow_run_id: str
    first_step: int                # the MLflow step of this epoch's first training step
    merge_dtype: str | None = None  # merged serving, trained elsewhere: the train host merges in this dtype (set by
                                    # the executor, which knows how vLLM serves)
    reference_version: str | None = None  # the KL reference's version (trainer.kl_reference: warm_start)
    reference_dir: str | None = None  # where the KL reference is when not the policy's own base (kl_reference_dir)
    vllm_numerics: str | None = None  # how vLLM computes, as the flow's host sees it (``vllm_numerics``); None: here


@dataclass
class TrainDone:
    """What computing a version gave: its steps and, unless every step was skipped, its folder on the machine that
    computed it, and what that machine chose for the settings that depend on it; a train host also says where it
    logged the checkpoint in MLflow."""

    steps: list[dict[str, float]]
    path: str | None
    source: str | None = None
    host: str | None = None
    chosen: dict[str, str] = field(default_factory=dict)  # what the machine that trained chose (``machine_choices``)


# runs a TrainJob somewhere (epoch/train_hosts.py: on a Ray node) and gives back what it made; asks should_stop
Executor = Callable[[TrainJob, "Callable[[], bool] | None"], TrainDone]


def compute_version(job: TrainJob, *, on_step: Callable[[int, dict[str, float]], None] | None,
                    should_stop: Callable[[], bool] | None = None, rank: Rank | None = None) -> TrainDone:
    """Train the job's samples and save the version to ``trainer.output_dir/<policy>/<version>`` on this machine,
    published to ``serving.weights_uri`` when set (without the optimizer state); on ranks > 0 nothing is saved.
    ``on_step(i, metrics)`` gets each step's metrics as it ends."""
    config, cfg = job.config, job.cfg
    seed_everything(cfg.seed + job.epoch)
    if rank is None:
        device, cfg = trainer_device(config, cfg)
    else:  # a rank on a train host: the node's first device of the kind (Ray sets CUDA_VISIBLE_DEVICES per task)
        device = pick_device(cfg.device)
        if device.type == "cuda":
            device = torch.device("cuda", 0)
            torch.cuda.set_device(device)
    cfg, chosen = machine_choices(config, cfg, device=device, vllm=job.vllm_numerics)
    amp = autocast_dtype(cfg.dtype, device)
    model = load_policy_model(
        job.base_model_dir, finetune=cfg.finetune, device=device, bf16=amp is not None, lora_r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, lora_target_modules=cfg.lora_target_modules,
        parent_adapter_dir=job.parent_adapter_dir, gradient_checkpointing=cfg.gradient_checkpointing,
    )
    on_step = on_step or (lambda i, m: None)
    optimizer = None
    parent_dir = job.parent_state_dir or job.parent_adapter_dir or (job.base_model_dir if job.parent_version else None)
    if cfg.mode == "sft":  # one process (on a train host, each rank trains alike and rank 0 saves)
        steps, optimizer = run_sft(model, job.samples, cfg=cfg, device=device, amp=amp, seed=cfg.seed + job.epoch,
                                   parent_dir=parent_dir, should_stop=should_stop, on_step=on_step)
    else:
        if rank is not None:
            broadcast_parameters([p for p in model.parameters() if p.requires_grad])
            run = run_grpo
        else:
            run = run_grpo if cfg.processes == 1 else run_grpo_distributed
        steps, optimizer = run(model, job.samples, cfg=cfg, base_model_dir=job.base_model_dir, device=device, amp=amp,
                               seed=cfg.seed + job.epoch, parent_dir=parent_dir, parent_adapter_dir=job.parent_adapter_dir,
                               should_stop=should_stop, on_step=on_step, reference_dir=job.reference_dir)
    if (rank is not None and rank.rank != 0) or all(s.get("skipped") for s in steps):
        return TrainDone(steps=steps, path=None, chosen=chosen)
    root = Path(cfg.output_dir) / job.policy
    # a folder of that name is an interrupted training's (saved, never recorded): nothing points at it
    path = save_atomically(lambda tmp: _save_model(model, tmp, cfg=cfg, base_model_dir=job.base_model_dir,
                                                   optimizer=optimizer),
                           root=root, name=job.version, replace=True)
    if config.serving.weights_uri:  # for vLLM hosts that do not share this disk: before the version is recorded
        published.publish(path, published.join(config.serving.weights_uri, job.policy, job.version),
                          options=config.serving.weights_storage_options, leave_out=SERVING_LEAVES_OUT)
    return TrainDone(steps=steps, path=str(path), chosen=chosen)


def machine_choices(config: ArclightConfig, cfg: TrainerConfig, *, device: torch.device,
                    vllm: str | None = None) -> tuple[TrainerConfig, dict[str, str]]:
    """The settings that depend on the machine that trains, chosen on it (a train host's own device, not the flow's):
    GRPO's tree attention backend (``trainer.attention``) and behaviour correction with why; ``cfg`` with the
    correction resolved. The flow logs them as the MLflow params of the policy's run. ``vllm``: how vLLM computes, as
    the flow's host sees it (``vllm_numerics``; default: as this machine does)."""
    if cfg.mode != "grpo":
        return cfg, {}
    correction, why = behaviour_correction(config, cfg, device=device, vllm=vllm)
    chosen = {"attention_backend": choose_attention(cfg.attention, device=device),
              "behaviour_correction_used": correction, "behaviour_correction_why": why}
    return cfg.model_copy(update={"behaviour_correction": correction}), chosen


def train_policy(
    config: ArclightConfig,
    triplets: Any,
    *,
    policy: str,
    base_model_dir: str | Path,
    parent_adapter_dir: str | Path | None = None,
    parent_version: str | None = None,
    run_id: str,
    epoch: int,
    epoch_metrics: dict[str, float] | None = None,
    catalog: Catalog | None = None,
    should_stop: Callable[[], bool] | None = None,
    executor: Executor | None = None,
) -> TrainResult:
    """Train ``policy`` on its triplets of one epoch; save, record and register the new version. ``epoch_metrics``
    (the epoch stage's sampling counts, ``sampling/...``) are logged beside the training's own. ``should_stop``:
    asked before every GRPO micro-batch (``grpo.train_grpo``). ``executor``: where the compute runs (a train host,
    ``epoch/train_hosts.py``); default here. The samples, the MLflow run, the version's name, its registration and
    its catalog row stay with the caller either way."""
    cfg = config.trainer_for(policy)
    # the attention's backend and the behaviour correction are chosen where the version trains (machine_choices): on a
    # train host, its own device; they are logged once it reports them
    params = {"policy": policy, "base_model": str(base_model_dir), **cfg.model_dump(mode="json")}
    learning_rate = scheduled_learning_rate(cfg, epoch=epoch, epochs=config.epochs)
    cfg = cfg.model_copy(update={"learning_rate": learning_rate})
    rows = [r for r in rows_of(triplets) if r.get("policy") in (None, policy)]
    stats = epoch_stats(rows, success_reward=cfg.success_reward)
    catalog = catalog or Catalog.from_config(config)
    catalog.ensure()
    if parent_adapter_dir is not None and parent_version is None:
        parent_version = versions.version_at_path(catalog, str(Path(parent_adapter_dir).resolve()))

    if cfg.mode == "sft":
        picked = select_sft_rows(rows, min_reward=cfg.sft_min_reward, top_fraction=cfg.sft_top_fraction)
        samples, counts = make_samples(picked, max_prompt_length=cfg.max_prompt_length,
                                       max_response_length=cfg.max_response_length,
                                       use_recorded_logprobs=False, keep_zero_advantage=True)
    else:
        trained_from = versions.version_number(parent_version) if parent_version else 0
        rows, stale = within_staleness(rows, trained_from=trained_from, max_staleness=config.trainer.max_staleness)
        if stale["staleness_dropped_groups"]:
            log.warning("policy %r epoch %d: %d groups (%d triplets) left out: sampled more than trainer.max_staleness="
                        "%d versions before %s", policy, epoch, stale["staleness_dropped_groups"],
                        stale["staleness_dropped_triplets"], config.trainer.max_staleness, parent_version)
        samples, counts = make_samples(rows, max_prompt_length=cfg.max_prompt_length,
                                       max_response_length=cfg.max_response_length,
                                       use_recorded_logprobs=cfg.use_recorded_logprobs, trained_from=trained_from)
        counts.update(stale)
    stats.update({k: float(v) for k, v in counts.items()})
    stats["trainable_triplets"] = float(len(samples))
    stats["mode"] = cfg.mode  # recorded with the version: an SFT version is a warm start (versions.warm_start)
    reference_version, reference_dir = None, None
    if cfg.mode == "grpo":
        reference_version, reference_dir = kl_reference_dir(catalog, cfg, policy=policy, run_id=run_id,
                                                            parent_version=parent_version, base_model_dir=base_model_dir)
        stats["kl_reference"] = cfg.kl_reference if cfg.beta != 0.0 else "off"
        stats["kl_reference_version"] = reference_version

    stats["learning_rate"] = learning_rate
    with tracking.start_run(config, run_id=run_id, policy=policy, params=params, lake=catalog.lake_id()) as run:
        mlflow_run_id = run.info.run_id
        sampled = {k: float(v) for k, v in (epoch_metrics or {}).items()}
        stats.update(sampled)
        tracking.log_metrics({**{k: stats[k] for k in tracking.EPOCH_METRICS}, **sampled,
                              "learning_rate": learning_rate}, step=epoch)
        tracking.log_reward_curve(mlflow_run_id, epoch=epoch)
        tracking.log_samples(rows, epoch=epoch, limit=cfg.log_samples)
        if not samples:
            message = _nothing_to_train(cfg, stats, policy=policy, epoch=epoch)
            log.warning(message)
            mlflow.set_tag(f"epoch_{epoch}.outcome", "no_trainable_triplets")
            return TrainResult(policy=policy, run_id=run_id, epoch=epoch, version=None, parent_version=parent_version,
                               path=None, metrics=stats, mlflow_run_id=mlflow_run_id, message=message)

        first_step = tracking.next_step(mlflow_run_id)
        version = versions.next_version(catalog, policy=policy)
        job = TrainJob(config=config, policy=policy, version=version, run_id=run_id, epoch=epoch, cfg=cfg,
                       samples=samples, base_model_dir=str(base_model_dir), parent_version=parent_version,
                       parent_adapter_dir=str(parent_adapter_dir) if parent_adapter_dir else None, parent_state_dir=None,
                       mlflow_run_id=mlflow_run_id, first_step=first_step, reference_version=reference_version,
                       reference_dir=reference_dir, vllm_numerics=vllm_numerics(config))
        t0 = time.perf_counter()
        if executor is None:
            done = compute_version(job, on_step=lambda i, m: tracking.log_metrics(m, step=first_step + i),
                                   should_stop=should_stop)
        else:
            done = executor(job, should_stop)
        steps = done.steps
        stats.update(_summarise(steps, elapsed=time.perf_counter() - t0))
        if done.chosen:  # as the machine that trained chose them
            tracking.log_params(done.chosen)
            stats["behaviour_correction"] = done.chosen["behaviour_correction_used"]  # recorded with the version
        tracking.log_metrics({k: stats[k] for k in ("skipped_steps", "optimizer_steps", *EPOCH_START.values())
                              if k in stats and math.isfinite(stats[k])}, step=epoch)
        # the policy's mean entropy per sampled token over the epoch's steps: per step it is `entropy`
        tracking.log_metrics({"entropy/epoch_mean": stats["entropy"]}, step=epoch)
        if stats["optimizer_steps"] == 0:
            message = (f"policy {policy!r} epoch {epoch}: all {len(steps)} steps were skipped (non-finite loss "
                       "or gradients); no new version")
            log.warning(message)
            mlflow.set_tag(f"epoch_{epoch}.outcome", "all_steps_skipped")
            return TrainResult(policy=policy, run_id=run_id, epoch=epoch, version=None, parent_version=parent_version,
                               path=None, metrics=stats, steps=steps, mlflow_run_id=mlflow_run_id, message=message)

        assert done.path is not None
        path, root = Path(done.path), cfg.output_dir / policy
        source = done.source or tracking.log_checkpoint(path, version=version)
        registry_version = tracking.register_version(config, policy=policy, source=source, mlflow_run_id=mlflow_run_id,
                                                     version=version, alias=cfg.registry_alias, lake=catalog.lake_id())
        versions.record_version(
            catalog, version=version, policy=policy, parent_version=parent_version, run_id=run_id, epoch=epoch,
            path=str(path), metrics=stats, kind=cfg.finetune, base_model=str(Path(base_model_dir).resolve()),
            mlflow_run_id=mlflow_run_id, registry_version=registry_version,
        )
        if path.is_dir():  # trained on this machine: else the train host's disk holds it (and the weights store)
            checkpoint.set_latest(root, version)
        mlflow.set_tag(f"epoch_{epoch}.outcome", f"trained:{version}")
        where = f" on {done.host}" if done.host else ""
        message = (f"policy {policy!r} epoch {epoch}: {version} from {int(stats['trainable_triplets'])} triplets, "
                   f"{int(stats['optimizer_steps'])} steps{where}, reward/mean {stats['reward/mean']:.3f}")
        log.info(message)
        return TrainResult(policy=policy, run_id=run_id, epoch=epoch, version=version, parent_version=parent_version,
                           path=path, metrics=stats, steps=steps, mlflow_run_id=mlflow_run_id,
                           registry_version=registry_version, message=message)


SERVING_LEAVES_OUT = (OPTIMIZER_STATE,)  # the optimizer's state resumes training here; vLLM never reads it (2x the adapter)


def _already_trained(row: dict[str, Any]) -> TrainResult:
    """The result of a policy's training that an earlier, interrupted run of the epoch already recorded."""
    message = (f"policy {row['policy']!r} epoch {row['epoch']}: {row['version']} was already trained on this epoch by "
               "an earlier run that stopped before the epoch was marked trained; not training it again")
    return TrainResult(policy=row["policy"], run_id=row["run_id"], epoch=row["epoch"], version=row["version"],
                       parent_version=row["parent_version"], path=Path(row["path"]), metrics=row["metrics"] or {},
                       mlflow_run_id=row["mlflow_run_id"], registry_version=row["registry_version"], message=message)


def kl_reference_dir(catalog: Catalog, cfg: TrainerConfig, *, policy: str, run_id: str, parent_version: str | None,
                     base_model_dir: str | Path) -> tuple[str | None, str | None]:
    """The KL reference of a GRPO epoch as (its version, its folder); (None, None) for the policy's base with LoRA (the
    adapter switched off) and when ``beta`` is 0. ``trainer.kl_reference``: base is the base model (full: the root of
    the lineage's, not the parent checkpoint ``base_model_dir`` is then); warm_start is ``versions.warm_start``."""
    if cfg.beta == 0.0:
        return None, None
    if cfg.kl_reference == "base":
        if cfg.finetune == "lora" or parent_version is None:
            return None, (None if cfg.finetune == "lora" else str(base_model_dir))
        return None, versions.lineage(catalog, parent_version)[-1]["base_model"]
    start = versions.warm_start(catalog, version=parent_version, run_id=run_id)
    if start is None:
        raise ValueError(
            f"trainer.kl_reference=warm_start (beta={cfg.beta}): policy {policy!r} has no warm start to take the KL to; "
            f"expected a version trained by an SFT epoch (trainer.mode sft) or by an earlier run in the lineage of "
            f"{parent_version or 'its parent'}, found "
            f"{'no version yet' if parent_version is None else 'only GRPO versions of run ' + repr(run_id)}. Train SFT "
            "epochs first (e.g. examples/rag/multihop_sft.yaml), or set trainer.kl_reference=base")
    return start["version"], start["path"]


VLLM_UNKNOWN = "unknown"  # an attached vLLM (serving.urls) whose serving.dtype is auto


def vllm_numerics(config: ArclightConfig) -> str:
    """How vLLM computes the policy, as this machine (the flow's, which starts it) sees it: ``<dtype> on <device>``;
    an attached vLLM (``serving.urls``) computes in ``serving.dtype`` on this machine's kind of device when that is
    set, and in an unknown way (``VLLM_UNKNOWN``) when it is auto."""
    if config.serving.urls and config.serving.dtype == "auto":
        return VLLM_UNKNOWN
    return f"{hardware.serving_dtype(config)} on {'cuda' if hardware.has_gpu() else 'cpu'}"


def behaviour_correction(config: ArclightConfig, cfg: TrainerConfig, *, device: torch.device | None = None,
                         vllm: str | None = None) -> tuple[str, str]:
    """The behaviour correction the GRPO loss uses, and why: ``trainer.behaviour_correction`` when set; auto is
    decoupled, and the reason says what parts vLLM's recorded logprobs from the trainer's in this run: stale samples
    (the epochs overlap), other numerics (bf16 serving, bf16 autocast, another device: the recorded logprobs differ
    from the trainer's even on-policy, and ppo's ratio against them clips tokens where they disagree), or, where
    both compute in fp32 on one kind of device, vLLM's constrained decoding alone (a grammar masks the logits before
    vLLM computes its logprobs). In fp32 too, decoupled learned more than ppo in 5 of 6 paired runs
    (docs/config.md#vllm-and-the-trainer), so auto no longer picks ppo anywhere. ``device``: the trainer's (default:
    ``trainer.device`` here); ``vllm``: how vLLM computes (``vllm_numerics``; default: as this machine sees it)."""
    if cfg.behaviour_correction != "auto":
        return cfg.behaviour_correction, "set by trainer.behaviour_correction"
    if config.trainer.max_staleness:
        return "decoupled", f"epochs overlap (trainer.max_staleness = {config.trainer.max_staleness})"
    device = pick_device(cfg.device) if device is None else device
    trainer = f"{'bfloat16 autocast' if autocast_dtype(cfg.dtype, device) is not None else 'float32'} on {device.type}"
    serving = vllm_numerics(config) if vllm is None else vllm
    if serving == VLLM_UNKNOWN:
        return "decoupled", (f"vLLM is attached (serving.urls) and serving.dtype does not say how it computes; the "
                             f"trainer computes {trainer}")
    if serving != trainer:
        return "decoupled", f"vLLM computes {serving}, the trainer {trainer}"
    return "decoupled", (f"vLLM and the trainer both compute {trainer}; decoupled all the same, for the logprobs "
                         f"vLLM records under a grammar (tool_choice, structured output) and because it learned no "
                         f"worse than ppo in fp32")


def scheduled_learning_rate(cfg: TrainerConfig, *, epoch: int, epochs: int) -> float:
    """The rate epoch ``epoch`` (0-based) of a run of ``epochs`` trains at, after ``cfg.lr_schedule``.

    The decay spans the run's last ``lr_decay_epochs`` epochs and reaches ``min_lr_ratio`` at the
    last one; epochs past the run's length (a run extended later) stay at the minimum.
    """
    if cfg.lr_schedule == "constant":
        return cfg.learning_rate
    span = min(cfg.lr_decay_epochs or epochs, epochs)
    progress = min(max((epoch - (epochs - span) + 1) / span, 0.0), 1.0)
    if cfg.lr_schedule == "linear":
        factor = 1.0 - progress
    else:
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.learning_rate * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * factor)


def train_policies(
    config: ArclightConfig,
    *,
    run_id: str,
    epoch: int,
    base_model_dir: str | Path,
    triplets: dict[str, Any] | None = None,
    epoch_metrics: dict[str, float] | None = None,
    catalog: Catalog | None = None,
    should_stop: Callable[[], bool] | None = None,
    executor: Executor | None = None,
) -> list[TrainResult]:
    """Train every policy of the config on its own triplets, one after another, each from its latest version
    (``executor``: where the compute runs, ``train_policy``)."""
    catalog = catalog or Catalog.from_config(config)
    catalog.ensure()
    results = []
    for policy in config.policies:
        done = versions.version_of_epoch(catalog, policy=policy.name, run_id=run_id, epoch=epoch)
        if done is not None:  # an interrupted run recorded it before the epoch was marked trained: never train twice
            results.append(_already_trained(done))
            log.warning(results[-1].message)
            continue
        if triplets is not None:
            table = triplets.get(policy.name, [])
        else:
            from lightning_core.store.outputs import load_triplets  # the SQL pipeline's output, read back

            table = load_triplets(config, run_id=run_id, epoch=epoch, policy=policy.name)
        parent = versions.latest_version(catalog, policy=policy.name)
        full = config.trainer_for(policy.name).finetune == "full"
        results.append(train_policy(
            config, table, policy=policy.name,
            base_model_dir=parent["path"] if (parent and full) else base_model_dir,
            parent_adapter_dir=parent["path"] if (parent and not full) else None,
            parent_version=parent["version"] if parent else None, run_id=run_id, epoch=epoch,
            epoch_metrics=epoch_metrics, catalog=catalog, should_stop=should_stop, executor=executor,
        ))
    return results


def trainer_device(config: ArclightConfig, cfg: TrainerConfig) -> tuple[torch.device, TrainerConfig]:
    """The trainer's device, and ``cfg`` with the CUDA devices of its ranks (``trainer.devices``, else the GPUs vLLM
    leaves it: ``common.gpu.device_plan``). CPU, or an explicit ``cuda:N``, is used as given."""
    device = pick_device(cfg.device)
    if device.type != "cuda" or device.index is not None:
        return device, cfg
    count = torch.cuda.device_count()
    if config.serving.urls and cfg.devices is None:  # vLLM runs elsewhere: every GPU here is the trainer's
        devices = list(range(count))
    else:
        devices = gpu.device_plan(gpus=count, serving=config.serving.devices, trainer=cfg.devices).trainer
    return torch.device("cuda", devices[0]), cfg.model_copy(update={"devices": devices})


def _save_model(model, folder: Path, *, cfg: TrainerConfig, base_model_dir, optimizer=None) -> None:
    model.save_pretrained(str(folder))
    if optimizer is not None and cfg.keep_optimizer_state:
        torch.save(optimizer.state_dict(), folder / OPTIMIZER_STATE)
    if cfg.finetune == "full":  # a full checkpoint must be loadable on its own: carry the tokenizer files
        import shutil

        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                     "generation_config.json"):
            src = Path(base_model_dir) / name
            if src.exists() and not (folder / name).exists():
                shutil.copy2(src, folder / name)


def _summarise(steps: list[dict[str, float]], *, elapsed: float) -> dict[str, float]:
    done = [s for s in steps if not s.get("skipped")]

    def mean(key: str) -> float:
        values = [s[key] for s in done if key in s and math.isfinite(s[key])]
        return sum(values) / len(values) if values else math.nan

    tokens = sum(s.get("step_tokens", 0.0) for s in steps)
    first = steps[0] if steps else {}
    return {
        **{epoch_key: first.get(step_key, math.nan) for step_key, epoch_key in EPOCH_START.items()},
        "loss": mean("loss"), "kl": mean("kl"), "clip_ratio": mean("clip_ratio"), "entropy": mean("entropy"),
        "grad_norm": mean("grad_norm"), "tokens_per_s": tokens / elapsed if tokens else math.nan,
        "optimizer_steps": float(len(done)), "skipped_steps": float(len(steps) - len(done)),
        "train_time_s": elapsed,
        "staleness/max": max((s.get("staleness/max", 0.0) for s in steps), default=0.0),
        "staleness/mean": mean("staleness/mean"),
    }


def _nothing_to_train(cfg: TrainerConfig, stats: dict[str, float], *, policy: str, epoch: int) -> str:
    if cfg.mode == "sft":
        why = (f"no triplet passed the SFT selection (sft_min_reward={cfg.sft_min_reward}, "
               f"sft_top_fraction={cfg.sft_top_fraction}; reward/mean {stats['reward/mean']:.3f})")
    elif stats["triplets"] == 0:
        why = "no triplets for this policy"
    elif stats["zero_adv_groups"] == stats["groups"]:
        why = (f"all {int(stats['groups'])} groups have equal rewards within the group (zero advantages), "
               "so there is no learning signal")
    else:
        why = (f"no trainable triplets among {int(stats['triplets'])} (zero advantage: "
               f"{int(stats['dropped_zero_advantage'])}, no tokens: {int(stats['dropped_no_tokens'])}, "
               f"bad advantage: {int(stats['dropped_bad_advantage'])})")
    return f"policy {policy!r} epoch {epoch}: nothing to train, {why}; no new version"
