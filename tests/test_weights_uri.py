"""Weights reach vLLM through object storage, not through the trainer's folder (issue 53, step 1).

With ``serving.weights_uri`` the trainer publishes each version to S3 (a real S3-compatible server here), the gateway
fetches it to its own folder and checks it against the manifest, and vLLM loads it from there: the folder vLLM reports
for the adapter is the gateway's copy, and it holds the trainer's bytes exactly. In merged mode the merged weights
travel the same way."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lightning_core.common.published import MANIFEST, published_manifest
from lightning_core.serving.vllm import weights_dir
from tests.test_faults import POLICY, _config

pytestmark = pytest.mark.integration


def _same_bytes(trained: Path, fetched: Path) -> bool:
    """Every file vLLM reads (all but the optimizer's state) is in ``fetched`` with the same bytes."""
    files = sorted(p.relative_to(trained) for p in trained.rglob("*") if p.is_file() and p.name != "optimizer.pt")
    return files == sorted(p.relative_to(fetched) for p in fetched.rglob("*") if p.is_file() and p.name != MANIFEST) \
        and all((trained / f).read_bytes() == (fetched / f).read_bytes() for f in files)


@pytest.mark.parametrize("mode", ["lora", "merged"])
def test_a_trained_version_reaches_vllm_through_s3_and_the_gateways_own_folder(mode, prefect_harness, s3, tmp_path,
                                                                              tiny_model_dir, caplog):
    from flows.train import train_epoch

    caplog.set_level("INFO", logger="arclight.redeploy")
    options = {"AWS_ENDPOINT_URL": s3}
    cfg, overrides = _config(tmp_path, tiny_model_dir, tasks=2, run_name=f"weights-{mode}", turns=2, **{
        "serving.redeploy": mode, "serving.weights_uri": f"s3://arclight/weights-{mode}",
        "serving.weights_storage_options": json.dumps(options), "evaluation.every_epochs": "null"})
    result = train_epoch(overrides=overrides)
    assert result["status"] == "completed" and result["new_version"] == f"{POLICY}-v1", result

    trained = cfg.trainer.output_dir / POLICY / f"{POLICY}-v1"
    served = trained.with_name(f"{trained.name}.merged") if mode == "merged" else trained
    uri = f"s3://arclight/weights-{mode}/{POLICY}/{served.name}"
    manifest = published_manifest(uri, options=options)
    assert manifest is not None and set(manifest.files) == {p.relative_to(served).as_posix() for p in served.rglob("*")
                                                            if p.is_file() and p.name != "optimizer.pt"}
    fetched = weights_dir(cfg) / POLICY / served.name
    assert _same_bytes(served, fetched)
    logs = cfg.project_dir / ".arclight" / "logs"
    # the folder vLLM loaded the version from is the gateway's copy, not the trainer's
    if mode == "lora":
        vllm_log = "".join(p.read_text(errors="replace") for p in logs.glob("vllm*.log"))
        assert f"Loaded new LoRA adapter: name '{POLICY}-v1', path '{fetched}'" in vllm_log
        assert str(trained) not in vllm_log
    else:
        assert f"reloaded the weights of {POLICY} from {fetched}" in caplog.text, caplog.text[-2000:]
