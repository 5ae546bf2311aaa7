"""The training stage on train hosts (``trainer.executor: ray``): the compute of each version runs as a Ray task on a
node that has ``trainer.ray_resources``, and ``trainer.processes: N`` as N rank tasks in a Ray placement group, one
bundle each, that meet through torch.distributed's own TCP rendezvous at rank 0 (gloo on CPU, nccl on GPUs). Ray
places them; nothing here schedules.

A train host shares no disk with the flow. It loads the base model as it resolves it, the parent version from its own
disk when it trained it and else from ``serving.weights_uri`` (with the optimizer state, which is published apart so
that vLLM's hosts fetch the lean copy), logs each step and the checkpoint to the MLflow server, saves the version on
its own disk and publishes it (and, in merged serving, the merged weights as ``<version>.merged``). The flow keeps the
samples, the version's name, its registration and its catalog row (``trainer/train.py::train_policy``). This module
places the ranks and waits for them; what moves and prunes the weights on a host's disk is ``common/host_weights.py``.

The first rank that fails stops the others (a rank left alone would wait in the all-reduce for ever) and the stage
fails with ``TrainHostError``: no version is made of half the gradients. Ray is told not to run a task again
(``max_retries=0``): a rank re-run alone could never meet the others.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any, Callable

from lightning_core.common import host_weights, published
from lightning_core.config import ArclightConfig
from lightning_core.epoch.failures import TrainHostError
from lightning_core.trainer.grpo import TrainingStopped
from lightning_core.trainer.grpo_run import OPTIMIZER_STATE
from lightning_core.trainer.train import SERVING_LEAVES_OUT, Executor, Rank, TrainDone, TrainJob, compute_version

log = logging.getLogger("arclight.train_hosts")

READY_TIMEOUT_S = 120.0  # how long the placement group may wait for its nodes


def ray_executor(config: ArclightConfig) -> Executor:
    """The executor of ``trainer.executor: ray``: each version's compute as Ray tasks on the cluster at
    ``trainer.address`` (default ``rollouts.address``)."""
    from lightning_core.serving.vllm import redeploy_mode, serving_dtype

    address = config.trainer.address or config.rollouts.address
    merge_dtype = serving_dtype(config) if redeploy_mode(config) == "merged" else None

    def execute(job: TrainJob, should_stop: Callable[[], bool] | None) -> TrainDone:
        import ray

        if not ray.is_initialized():
            ray.init(address=address, ignore_reinit_error=True, logging_level=logging.WARNING, log_to_driver=False)
        if job.cfg.finetune != "full":
            job = dataclasses.replace(job, merge_dtype=merge_dtype)
        world = job.cfg.processes if job.cfg.mode == "grpo" else 1
        need = _task_options(config.trainer.ray_resources)
        _check_cluster(need, world=world, address=address)
        task = ray.remote(max_retries=0)(train_on_host)
        if world == 1:
            refs = [task.options(**need).remote(job)]
            return _wait_for(refs, job=job, should_stop=should_stop)[0]
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        bundle = _bundle(need)
        group = placement_group([bundle] * world, strategy="PACK")
        try:
            ready, _ = ray.wait([group.ready()], timeout=READY_TIMEOUT_S)
            if not ready:
                raise TrainHostError(f"training {job.version} needs {world} bundles of {bundle} (trainer.processes = "
                                     f"{world}, trainer.ray_resources) and the Ray cluster at {address} could not place "
                                     f"them within {READY_TIMEOUT_S:.0f} s: start more train hosts, or lower "
                                     "trainer.processes; no version was made")
            at = [PlacementGroupSchedulingStrategy(placement_group=group, placement_group_bundle_index=r)
                  for r in range(world)]
            host, port = ray.get(ray.remote(max_retries=0)(_rendezvous).options(**need, scheduling_strategy=at[0]).remote())
            init_method = f"tcp://{host}:{port}"
            refs = [task.options(**need, scheduling_strategy=at[r]).remote(job, r, world, init_method) for r in range(world)]
            return _wait_for(refs, job=job, should_stop=should_stop)[0]
        finally:
            remove_placement_group(group)

    return execute


def _task_options(resources: dict[str, float]) -> dict[str, Any]:
    """Ray task options for ``trainer.ray_resources``: CPU and GPU as num_cpus / num_gpus, the rest by name."""
    rest = {k: float(v) for k, v in resources.items() if k not in ("CPU", "GPU")}
    return {"num_cpus": float(resources.get("CPU", 1)), "num_gpus": float(resources.get("GPU", 0)),
            **({"resources": rest} if rest else {})}


def _bundle(options: dict[str, Any]) -> dict[str, float]:
    """One rank's placement-group bundle (Ray takes no zero amounts there: a train host may offer no CPU to tasks, so
    that rollouts never land on it, and ``{"CPU": 0, "train": 1}`` asks for its train slot alone)."""
    bundle = {"CPU": options["num_cpus"], "GPU": options["num_gpus"], **options.get("resources", {})}
    return {k: v for k, v in bundle.items() if v}


def _check_cluster(need: dict[str, Any], *, world: int, address: str | None) -> None:
    """Fail at once, with the command that fixes it, when the cluster has no node with the trainer's resources."""
    import ray

    have = ray.cluster_resources()
    bundle = _bundle(need)
    short = {k: v * world for k, v in bundle.items() if have.get(k, 0.0) < v * world}
    if short:
        custom = {k: v for k, v in bundle.items() if k not in ("CPU", "GPU")}
        raise TrainHostError(
            f"the Ray cluster at {address} has {', '.join(f'{have.get(k, 0):g} {k}' for k in short)}, and training "
            f"needs {', '.join(f'{v:g} {k}' for k, v in short.items())} ({world} rank(s) of {bundle}: "
            "trainer.processes, trainer.ray_resources). Start a train host on each GPU or CPU machine: "
            f"`ray start --address {address} --resources '{_json(custom)}'`")


def _json(value: dict) -> str:
    import json

    return json.dumps(value)


def _rendezvous() -> tuple[str, int]:
    """On rank 0's node: its address and a free port for torch.distributed's TCP store."""
    import ray

    from lightning_core.common.services import free_port

    return ray.util.get_node_ip_address(), free_port()


def _wait_for(refs: list, *, job: TrainJob, should_stop: Callable[[], bool] | None) -> list[TrainDone]:
    """Every rank's result; the first failure cancels the others and fails the stage, and so does a stop."""
    import ray
    from ray.exceptions import RayError

    pending, results = list(refs), {}
    try:
        while pending:
            if should_stop is not None and should_stop():
                raise TrainingStopped(f"training {job.version} stopped on its train host(s): a stop was asked for")
            ready, pending = ray.wait(pending, num_returns=1, timeout=1.0)
            for ref in ready:
                try:
                    results[ref] = ray.get(ref)
                except RayError as exc:
                    rank = refs.index(ref)
                    others = " (the other ranks were stopped)" if len(refs) > 1 else ""
                    raise TrainHostError(f"training {job.version} failed on rank {rank} of {len(refs)}{others}: "
                                         f"{_cause(exc)}; no version was made of it") from None
    except BaseException:  # a failure, a stop, or Ctrl-C (KeyboardInterrupt in ray.wait): no rank trains on alone
        for ref in pending:
            try:
                ray.cancel(ref, force=True)
            except Exception as exc:  # noqa: BLE001 - the first error is the one to raise
                log.warning("could not cancel a rank of %s: %s", job.version, exc)
        raise
    return [results[ref] for ref in refs]


def _cause(exc: BaseException) -> str:
    """One line of what went wrong on the train host: the task's own exception when it raised one."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        return f"{type(cause).__name__}: {str(cause).strip().splitlines()[0] if str(cause).strip() else ''}"
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    line = lines[0] if lines else type(exc).__name__
    if len(line) > 240 and ". " in line[:240]:  # Ray's own text goes on with advice for its dashboard
        line = line[:line[:240].rindex(". ") + 1]
    return line


def train_on_host(job: TrainJob, rank: int = 0, world: int = 1, init_method: str | None = None) -> TrainDone:
    """Run on a train host (a Ray task): compute the version as rank ``rank`` of ``world``; rank 0 publishes it and logs
    its steps and checkpoint to the MLflow server."""
    import ray
    import torch

    from lightning_core import tracking

    config = job.config
    here = ray.util.get_node_ip_address()
    log.info("training %s as rank %d of %d on %s", job.version, rank, world, here)
    threads = os.environ.get("ARCLIGHT_TRAIN_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    job = _with_reference_here(_with_parent_here(job))
    if world > 1:
        import torch.distributed as dist

        from lightning_core.trainer.distributed import backend_for
        from lightning_core.trainer.policy_model import pick_device

        backend = backend_for(pick_device(job.cfg.device))
        if backend == "gloo":  # the interface of the node's own address: another may not reach the other hosts
            interface = _interface_of(here)
            if interface:
                os.environ.setdefault("GLOO_SOCKET_IFNAME", interface)
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world)
    try:
        on_step = tracking.step_logger(config, mlflow_run_id=job.mlflow_run_id,
                                       first_step=job.first_step) if rank == 0 else None
        done = compute_version(job, on_step=on_step, rank=Rank(rank, world) if world > 1 else None)
    finally:
        if world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()
    if done.path is None:  # a rank > 0 (or every step skipped): it made nothing, and may have fetched the parent
        settle_version(config, job, None)
        return dataclasses.replace(done, host=here)
    path = Path(done.path)
    settle_version(config, job, path)
    source = tracking.log_checkpoint_to(config, path, mlflow_run_id=job.mlflow_run_id, version=job.version)
    return dataclasses.replace(done, source=source, host=here)


def settle_version(config: ArclightConfig, job: TrainJob, path: Path | None) -> None:
    """What a train host does with the version it saved at ``path`` (None: it made none, a rank > 0):
    ``host_weights.settle_version``, with the merge of merged serving."""
    merge = None
    if path is not None and job.merge_dtype:
        from lightning_core.serving.redeploy import merge_adapter

        def merge(adapter: Path, out: Path) -> Path:
            return merge_adapter(base_model_dir=Path(job.base_model_dir), adapter_dir=adapter, out_dir=out,
                                 dtype=job.merge_dtype)
    host_weights.settle_version(config, path, policy=job.policy, version=job.version,
                                parent_version=job.parent_version, state_file=OPTIMIZER_STATE, merge=merge)


def _with_parent_here(job: TrainJob) -> TrainJob:
    """The job with the base model and the parent version as this host has them: the base model (LoRA's, and full
    fine-tuning's first version's) as this host resolves ``model.path``, never the flow's path; the parent from this
    host's disk when it trained it, else fetched from ``serving.weights_uri`` with its optimizer state."""
    config = job.config
    if job.cfg.finetune != "full" or job.parent_version is None:
        job = dataclasses.replace(job, base_model_dir=_base_model_here(job))
    if job.parent_version is None:
        return job
    parent = job.base_model_dir if job.cfg.finetune == "full" else job.parent_adapter_dir
    # trained here: unless an interrupted run's, which the store does not hold
    if host_weights.holds_published(config, parent, policy=job.policy, version=job.parent_version,
                                    leave_out=SERVING_LEAVES_OUT):
        return job
    try:
        fetched, state = host_weights.fetch_version(config, policy=job.policy, version=job.parent_version,
                                                    with_state=job.cfg.keep_optimizer_state)
    except published.PublishError as exc:
        raise TrainHostError(f"training {job.version} needs its parent {job.parent_version}, which this train host did "
                             f"not train and could not fetch: {exc}") from None
    log.info("fetched the parent %s from %s", job.parent_version, config.serving.weights_uri)
    if job.cfg.finetune == "full":
        return dataclasses.replace(job, base_model_dir=str(fetched), parent_state_dir=str(state) if state else None)
    return dataclasses.replace(job, parent_adapter_dir=str(fetched),
                               parent_state_dir=str(state) if state else str(fetched))


def _base_model_here(job: TrainJob) -> str:
    """The base model's folder on this host: ``model.path`` as configured (the job carries the config), resolved
    here: a folder, a Hugging Face id in this host's cache (downloaded unless offline), or the prepared SmolLM2 under
    this host's ``models/`` (``$ARCLIGHT_HOME``, else the checkout)."""
    import socket

    from lightning_core.common.model import ModelError, resolve_model

    try:
        return str(resolve_model(job.config))
    except ModelError as exc:
        raise TrainHostError(
            f"training {job.version} on train host {socket.gethostname()} needs the base model, which this host does "
            f"not have: {exc}. The flow's host resolved it to {job.base_model_dir}; each train host resolves model.path "
            "itself: prepare it there (`arclight model prepare`, or the same folder), or set model.path to a Hugging "
            "Face id (fetched into each host's cache)") from None


def _with_reference_here(job: TrainJob) -> TrainJob:
    """The job with its KL reference as this host has it (``trainer.kl_reference``): a warm-start version fetched from
    ``serving.weights_uri`` when this host did not train it; the base model as this host resolves it."""
    config = job.config
    if job.reference_dir is None:
        return job
    if Path(job.reference_dir).is_dir() and (job.reference_version is None or host_weights.holds_published(
            config, job.reference_dir, policy=job.policy, version=job.reference_version, leave_out=SERVING_LEAVES_OUT)):
        return job
    if job.reference_version is None:  # full fine-tuning's base model
        from lightning_core.serving.vllm import model_dir

        return dataclasses.replace(job, reference_dir=str(model_dir(config)))
    try:
        fetched, _ = host_weights.fetch_version(config, policy=job.policy, version=job.reference_version)
    except published.PublishError as exc:
        raise TrainHostError(f"training {job.version} takes its KL to {job.reference_version} (trainer.kl_reference="
                             f"warm_start), which this train host did not train and could not fetch: {exc}") from None
    return dataclasses.replace(job, reference_dir=str(fetched))


def _interface_of(address: str) -> str | None:
    """The network interface that holds ``address`` on this host (``ip -o addr``), or None."""
    import subprocess

    try:
        out = subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        parts = line.split()
        if len(parts) > 3 and parts[3].split("/")[0] == address:
            return parts[1]
    return None
