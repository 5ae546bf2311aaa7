"""Redeploy a new policy version to every vLLM replica, verify it, and switch the gateway to it.

    deployment = deploy_adapter(gateway=GatewayClient(url), replicas=[...], policy="default",
                                adapter_dir=Path("checkpoints/v3"), version=3)

A LoRA adapter is hot-loaded (``/v1/load_lora_adapter``) under ``<policy>-v<version>`` on every
replica, answered a real request on each, and only then made current in the gateway (one atomic
switch). The previous version stays loaded for rollback; versions older than ``keep_versions``
are unloaded. Any failure before the switch unloads what was loaded and raises
``RedeployError`` with the reason, so the previous version keeps serving.

Full checkpoints are reloaded in place (``reload_weights`` through vLLM's ``/collective_rpc``,
available when vLLM runs with ``VLLM_SERVER_DEV_MODE=1``, as ``start_vllm`` does); restarting
vLLM with the new ``model.path`` is the last resort and is left to the caller.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from lightning_core.serving.client import GatewayClient

log = logging.getLogger("arclight.redeploy")

RELOAD_TIMEOUT_S = 600.0  # a reload of merged weights in place may take this long (a 7B model, slow storage)


class RedeployError(RuntimeError):
    """A redeploy that did not happen; the previous version still serves. The message says why."""


class ReplicaRefused(RedeployError):
    """A replica that refused the connection: down or restarting."""


@dataclass
class Deployment:
    """A policy version now serving: its served name, timings and the versions unloaded."""

    policy: str
    version: int
    served_model: str
    load_s: float
    first_answer_s: float
    switch_s: float
    verify_text: str
    unloaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # replicas that could not be reached (down): not loaded


def served_name(policy: str, version: int) -> str:
    """Return the name vLLM serves a policy version under."""
    return f"{policy}-v{version}"


def check_adapter_dir(adapter_dir: Path) -> None:
    """Raise ``RedeployError`` unless ``adapter_dir`` looks like a peft LoRA adapter folder."""
    adapter_dir = Path(adapter_dir)
    config = adapter_dir / "adapter_config.json"
    if not config.is_file():
        raise RedeployError(f"{adapter_dir} is not a LoRA adapter folder: adapter_config.json is missing")
    try:
        json.loads(config.read_text())
    except ValueError as exc:
        raise RedeployError(f"{config} is not valid JSON: {exc}") from None
    if not any((adapter_dir / n).is_file() for n in ("adapter_model.safetensors", "adapter_model.bin")):
        raise RedeployError(f"{adapter_dir} has no adapter_model.safetensors (or .bin)")


def deploy_adapter(
    *,
    gateway: GatewayClient,
    replicas: list[str],
    policy: str,
    adapter_dir: Path,
    version: int | None = None,
    keep_versions: int = 2,
    verify_prompt: str = "Say hi.",
    timeout_s: float = 120.0,
    fetched: bool = False,
) -> Deployment:
    """Load ``adapter_dir`` as a new version of ``policy`` on every replica, verify, switch, prune. ``fetched``: the
    folder is on vLLM's host, where the gateway fetched it and checked it against its manifest (``weights_uri``)."""
    started = time.perf_counter()
    if not fetched:
        check_adapter_dir(adapter_dir)
    current = gateway.policies()["policies"].get(policy) or {"served_model": None, "version": 0, "history": []}
    version = version if version is not None else int(current["version"]) + 1
    name = served_name(policy, version)
    if name == current["served_model"]:
        raise RedeployError(f"{name} is already the current version of policy {policy!r}: deploy it as a new version")
    loaded: list[str] = []
    with httpx.Client(timeout=timeout_s) as http:
        served, skipped = _reachable(http, [r.rstrip("/") for r in replicas], policy)
        replicas = list(served)
        try:
            for replica in replicas:  # one that kept it loaded (a gateway restart, an attached vLLM) serves it already
                if _load_ours(http, replica, served[replica], name, adapter_dir):
                    loaded.append(replica)  # so that a failure on the next one unloads it again
            load_s = time.perf_counter() - started
            texts = [_verify(http, replica, name, verify_prompt) for replica in replicas]
            first_answer_s = time.perf_counter() - started
        except BaseException:
            for replica in loaded:
                _unload(http, replica, name)
            raise
        try:
            gateway.switch_policy(policy, served_model=name, version=version)
        except Exception as exc:
            for replica in loaded:
                _unload(http, replica, name)
            raise RedeployError(f"the gateway refused to switch policy {policy!r} to {name}: {exc}") from exc
        switch_s = time.perf_counter() - started
        older = [m for m in [current["served_model"], *(h["served_model"] for h in current["history"])] if m and m != name]
        stale = older[max(keep_versions - 1, 0):]
        for model in stale:
            for replica in replicas:
                _unload(http, replica, model)
    log.info("policy %s now serves %s (verified in %.2f s, unloaded %s)", policy, name, first_answer_s, stale)
    return Deployment(policy=policy, version=version, served_model=name, load_s=load_s, first_answer_s=first_answer_s,
                      switch_s=switch_s, verify_text=texts[0], unloaded=stale, skipped=skipped)


def _reachable(http: httpx.Client, replicas: list[str], policy: str) -> tuple[dict[str, set[str]], list[str]]:
    """The models each replica that answers serves, and the replicas that refuse the connection (down or restarting).

    An adapter redeploy goes on without a replica that is down: the gateway sends its rollouts to
    their next replica, and a replica that comes back without the adapter answers "does not
    exist", which the gateway also falls over from; the next redeploy loads it there too.
    """
    up, down = {}, []
    for replica in replicas:
        try:
            up[replica] = _served(http, replica)
        except ReplicaRefused as exc:  # a slow or failing replica is not skipped: it stops the redeploy
            log.warning("%s: policy %s is redeployed without it", exc, policy)
            down.append(replica)
    if not up:
        raise RedeployError(f"none of the vLLM replicas {replicas} can be reached: start them (arclight up, or serving.urls) "
                            f"before redeploying policy {policy!r}")
    return up, down


def deploy_full_weights(
    *,
    gateway: GatewayClient,
    replicas: list[str],
    policy: str,
    model_dir: Path,
    version: int,
    verify_prompt: str = "Say hi.",
    timeout_s: float = RELOAD_TIMEOUT_S,
    fetched: bool = False,
) -> Deployment:
    """Reload full weights in place on every replica (``reload_weights``), verify, and switch the gateway.

    The base model's served name stays the same, so there is no rollback to the old weights
    without another reload; adapters trained on the old weights should be redeployed.
    """
    started = time.perf_counter()
    base = gateway.policies()["base_model"]
    texts, load_s = reload_full_weights(replicas=replicas, policy=policy, model_dir=model_dir, served_model=base,
                                        verify_prompt=verify_prompt, timeout_s=timeout_s, fetched=fetched)
    first_answer_s = time.perf_counter() - started
    gateway.switch_policy(policy, served_model=base, version=version)
    return Deployment(policy=policy, version=version, served_model=base, load_s=load_s, first_answer_s=first_answer_s,
                      switch_s=time.perf_counter() - started, verify_text=texts[0])


def reload_full_weights(*, replicas: list[str], policy: str, model_dir: Path, served_model: str,
                        verify_prompt: str = "Say hi.", timeout_s: float = RELOAD_TIMEOUT_S,
                        fetched: bool = False) -> tuple[list[str], float]:
    """Reload ``model_dir``'s weights in place on every replica, reset their prefix caches and verify each with a real
    request to ``served_model``; return the answers and the seconds the reloads took. Switches nothing: a replica
    restarted under a version the gateway serves already catches up this way (``epoch.deploy.restore_serving``)."""
    started = time.perf_counter()
    if not fetched and not (Path(model_dir) / "config.json").is_file():
        raise RedeployError(f"{model_dir} is not a model folder: config.json is missing")
    with httpx.Client(timeout=timeout_s) as http:
        for replica in replicas:
            try:
                response = http.post(f"{replica}/collective_rpc", json={
                    "method": "reload_weights", "kwargs": {"weights_path": str(Path(model_dir).resolve())}})
            except httpx.TransportError as exc:
                raise RedeployError(
                    f"vLLM at {replica} cannot be reached ({exc!r}): a full-weight redeploy needs every replica of policy "
                    f"{policy!r}, since one left on the old weights would answer under the same name. Restart it (replicas "
                    "Arclight started are restarted by the next redeploy), or remove it from serving.urls") from None
            if response.status_code == 404:
                raise RedeployError(f"vLLM at {replica} has no /collective_rpc (start it with VLLM_SERVER_DEV_MODE=1, "
                                    "as start_vllm does) or restart it with model.path set to the new checkpoint")
            if response.status_code != 200:
                raise RedeployError(f"vLLM at {replica} could not reload weights from {model_dir}: "
                                    f"{response.status_code} {response.text[:2000]}")
            log.info("vLLM at %s reloaded the weights of %s from %s", replica, policy, model_dir)
            # cached prefixes were computed with the old weights (every rollout shares its system prompt)
            reset = http.post(f"{replica}/reset_prefix_cache")
            if reset.status_code != 200:
                raise RedeployError(f"vLLM at {replica} reloaded weights but could not reset its prefix cache: "
                                    f"{reset.status_code} {reset.text[:500]}")
        load_s = time.perf_counter() - started
        return [_verify(http, replica, served_model, verify_prompt) for replica in replicas], load_s


def restore_adapter(*, replicas: list[str], policy: str, adapter_dir: Path, version: int, verify_prompt: str = "Say hi.",
                    timeout_s: float = 120.0, fetched: bool = False) -> list[str]:
    """Load the serving version of ``policy`` onto ``replicas`` that lack it (restarted ones); return those loaded.

    The gateway already serves that version, so nothing is switched: the replicas only catch up.
    """
    if not fetched:
        check_adapter_dir(adapter_dir)
    name, loaded = served_name(policy, version), []
    with httpx.Client(timeout=timeout_s) as http:
        for replica in (r.rstrip("/") for r in replicas):
            if _load_ours(http, replica, _served(http, replica), name, adapter_dir):
                _verify(http, replica, name, verify_prompt)
                loaded.append(replica)
    return loaded


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "chat_template.jinja", "vocab.json", "merges.txt")


MERGED_FROM = "merged_from.json"  # in a merged folder: the adapter's files (sha256), the base model and the dtype


def merge_adapter(*, base_model_dir: Path, adapter_dir: Path, out_dir: Path, dtype: str = "bfloat16") -> Path:
    """Write base weights with the LoRA adapter merged in to ``out_dir`` (atomically); reuse it when it was merged from
    these adapter files, base model and dtype (``merged_from.json``). One merged from other ones is made again: a
    version trained again after an interrupted run is another adapter under the same name.

    On CPU, vLLM serves a LoRA adapter several times slower than plain weights, so there the
    redeploy path merges and reloads weights in place instead of loading the adapter.
    """
    import shutil

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lightning_core.common.durable import save_atomically

    out_dir = Path(out_dir)
    check_adapter_dir(adapter_dir)
    source = _merge_source(base_model_dir=base_model_dir, adapter_dir=adapter_dir, dtype=dtype)
    try:
        if (out_dir / "config.json").is_file() and json.loads((out_dir / MERGED_FROM).read_text()) == source:
            return out_dir
    except (OSError, ValueError):  # none recorded (or an older Arclight's merge): made again
        pass

    def write(tmp: Path) -> None:
        base = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=getattr(torch, dtype))
        merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
        merged.save_pretrained(tmp, safe_serialization=True)
        for name in TOKENIZER_FILES:
            if (Path(base_model_dir) / name).is_file():
                shutil.copy2(Path(base_model_dir) / name, tmp / name)
        (tmp / MERGED_FROM).write_text(json.dumps(source, indent=1, sort_keys=True))

    return save_atomically(write, root=out_dir.parent, name=out_dir.name, replace=True)


def _merge_source(*, base_model_dir: Path, adapter_dir: Path, dtype: str) -> dict:
    """What a merge is made of: the adapter's files by sha256 (not its optimizer state), the base model and the dtype."""
    from lightning_core.common.published import sha256_of

    files = sorted(p for p in Path(adapter_dir).iterdir() if p.is_file() and p.name.startswith("adapter_"))
    return {"adapter": {p.name: sha256_of(p) for p in files}, "base_model": str(Path(base_model_dir).resolve()),
            "dtype": dtype}


def _served(http: httpx.Client, replica: str) -> dict[str, str | None]:
    """Return the models (base and adapters) ``replica`` serves now: name -> the folder vLLM loaded it from."""
    try:
        response = http.get(f"{replica}/v1/models")
        response.raise_for_status()
    except httpx.ConnectError as exc:
        raise ReplicaRefused(f"vLLM at {replica} refused the connection: {exc!r}") from None
    except httpx.HTTPError as exc:
        raise RedeployError(f"vLLM at {replica} could not be asked for its models: {exc!r}") from None
    return {m.get("id"): m.get("root") for m in response.json().get("data", [])}


def _load_ours(http: httpx.Client, replica: str, served: dict[str, str | None], name: str, adapter_dir: Path) -> bool:
    """Load ``adapter_dir`` as ``name`` on ``replica`` unless it serves it from there already; True when it loaded.

    The same name from another folder is another project's adapter (two projects with a policy of one name on an
    attached vLLM, or an earlier run of this one): its weights are not these, and vLLM reads its folder again
    whenever it evicts and reloads it. It is unloaded first."""
    ours = Path(adapter_dir).resolve()
    if name in served:
        if served[name] and Path(served[name]).resolve() == ours:
            return False
        log.warning("vLLM at %s serves %s from %s, not this run's folder: unloading it to load this run's weights",
                    replica, name, served[name])
        _unload(http, replica, name)
    _load(http, replica, name, ours)
    return True


def _load(http: httpx.Client, replica: str, name: str, path: Path) -> None:
    try:
        response = http.post(f"{replica}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)})
    except httpx.HTTPError as exc:
        raise RedeployError(f"vLLM at {replica} could not be reached to load {name}: {exc!r}") from None
    if response.status_code != 200:
        raise RedeployError(f"vLLM at {replica} refused adapter {path} as {name}: {response.status_code} {_message(response)}")


def _unload(http: httpx.Client, replica: str, name: str) -> None:
    try:
        response = http.post(f"{replica}/v1/unload_lora_adapter", json={"lora_name": name})
        if response.status_code != 200:
            log.warning("vLLM at %s could not unload %s: %s", replica, name, _message(response))
    except httpx.HTTPError as exc:
        log.warning("vLLM at %s could not be reached to unload %s: %r", replica, name, exc)


def _verify(http: httpx.Client, replica: str, name: str, prompt: str) -> str:
    """Send one real request for ``name`` to ``replica``; return the answer's text."""
    try:
        response = http.post(f"{replica}/v1/chat/completions", json={
            "model": name, "messages": [{"role": "user", "content": prompt}], "max_tokens": 4, "temperature": 0})
    except httpx.HTTPError as exc:
        raise RedeployError(f"vLLM at {replica} could not be reached to verify {name}: {exc!r}") from None
    if response.status_code != 200:
        raise RedeployError(f"vLLM at {replica} loaded {name} but a request to it failed: {response.status_code} {_message(response)}")
    data = response.json()
    if not data.get("choices") or not (data.get("usage") or {}).get("completion_tokens"):
        raise RedeployError(f"vLLM at {replica} answered a request to {name} with no tokens: {json.dumps(data)[:500]}")
    return data["choices"][0]["message"].get("content") or ""


def _message(response: httpx.Response) -> str:
    try:
        data = response.json()
        err = data.get("error", data) if isinstance(data, dict) else data
        return str(err.get("message") if isinstance(err, dict) else err)[:2000]
    except ValueError:
        return response.text[:2000]
