"""Any task id a JSON dataset holds trains (issue 51, finding 1): ``gsm8k/train/17``, ``q 17``, ``2+2``, a URL or a
300-character hash once made rollout ids the gateway refused, and every rollout was blamed on our services."""

from __future__ import annotations

import hashlib
import json

import pytest

from lightning_core import names
from lightning_core.epoch import bookkeeping as ep
from lightning_core.rollouts import dataset
from lightning_core.store.catalog import Catalog
from lightning_core.config import load_config

ODD_IDS = ["gsm8k/train/17", "q 17", "2+2", "https://example.org/tasks?id=3#x", hashlib.sha512(b"x").hexdigest() * 2 + "ab",
           "naïve—ünïcode", "tab\there", "line\nbreak", "q_17", 42]


def test_task_ids_a_real_dataset_writes_make_valid_distinct_and_stable_rollout_ids(tmp_path):
    path = tmp_path / "tasks.jsonl"
    path.write_text("".join(json.dumps({"id": i, "question": "?"}) + "\n" for i in ODD_IDS))
    tasks = dataset.load_tasks(path)
    assert [t["id"] for t in tasks] == [str(i) for i in ODD_IDS]  # kept as written (a number as its JSON text)
    cfg = load_config(None, overrides=[f"project_dir={tmp_path}", f"rollouts.dataset={path}", "rollouts.group_size=3",
                                       "run_name=" + "r" * 128])
    catalog = Catalog.from_config(cfg)
    catalog.ensure()
    for mode, epoch in (("train", 2**40), ("eval", 7)):
        specs = ep.plan_tasks(catalog, run_id=cfg.run_name, epoch=epoch, mode=mode, tasks=tasks, group_size=3)
        assert len(specs) == 3 * len(ODD_IDS) == len({s.rollout_id for s in specs})  # none lost to a collision
        for s in specs:
            assert names.check_rollout_id(s.rollout_id) == s.rollout_id
            assert s.rollout_id.endswith(f"-{s.sample_index}")  # agents read the sample index there
            assert s.rollout_id == ep.rollout_id(run_id=cfg.run_name, epoch=epoch, mode=mode, task_id=s.task_id,
                                                 sample=s.sample_index)
        assert {s.task_id for s in specs} == {str(i) for i in ODD_IDS}
    assert names.rollout_id_part("q17") == "q17"  # ids that are already safe stay readable
    assert names.rollout_id_part("q 17") != names.rollout_id_part("q_17")


@pytest.mark.parametrize("line, problem", [
    ('{"id": null}', "is a JSON null"),
    ('{"id": {"split": "train"}}', "is a JSON object"),
    ('{"id": ["a"]}', "is a JSON array"),
    ('{"id": true}', "is a JSON boolean"),
    ('{"id": ""}', "has 0 characters"),
    ('{"id": "' + "x" * 1025 + '"}', "has 1025 characters"),
    ('{"id": "a\\u0000b"}', "holds a NUL character"),
    ('{"id": "\\ud800"}', "holds a lone surrogate"),
])
def test_an_id_that_cannot_travel_is_refused_when_the_dataset_loads_with_its_line_and_the_rule(tmp_path, line, problem):
    path = tmp_path / "tasks.jsonl"
    path.write_text('{"id": "fine"}\n' + line + "\n")
    with pytest.raises(dataset.DatasetError) as err:
        dataset.load_tasks(path)
    message = str(err.value)
    assert message.startswith(f"{path}:2: ") and problem in message and dataset.TASK_ID_RULE in message


def test_two_ids_that_would_share_a_rollout_id_are_refused_not_silently_merged(tmp_path):
    crafted = f"q_17-{hashlib.blake2b('q 17'.encode(), digest_size=5).hexdigest()}"  # what 'q 17' becomes
    cfg = load_config(None, overrides=[f"project_dir={tmp_path}"])
    catalog = Catalog.from_config(cfg)
    catalog.ensure()
    with pytest.raises(dataset.DatasetError, match="make the same rollout id"):
        ep.plan_tasks(catalog, run_id="r", epoch=0, mode="train", tasks=[{"id": "q 17"}, {"id": crafted}], group_size=2)


@pytest.mark.integration
def test_an_epoch_whose_task_ids_are_paths_spaces_urls_and_long_hashes_trains_every_group_and_blames_nobody(
        prefect_harness, tmp_path, vllm_server, collector, collector_config, tiny_model_dir):
    from flows.train import train_epoch
    from tests.test_flows import _dataset, _overrides

    ids = ["gsm8k/train/17", "q 17", "2+2", "https://example.org/tasks?id=3#x", hashlib.sha256(b"x").hexdigest() * 5,
           "tab\there"]
    rows = [{"id": i, "question": f"Say the word {w}.", "target": w}
            for i, w in zip(ids, ["xyzzy", "plugh", "qwfp", "zork", "frotz", "gnusto"])]
    overrides = _overrides(tmp_path, vllm_server=vllm_server, collector=collector, collector_config=collector_config,
                           tiny_model_dir=tiny_model_dir, dataset=_dataset(tmp_path / "tasks.jsonl", rows),
                           **{"rollouts.group_size": "2", "run_name": "odd-ids"})
    result = train_epoch(overrides=overrides)
    cfg = load_config(None, overrides=overrides)
    with Catalog.from_config(cfg).read() as con:
        rollouts = con.execute("SELECT task_id, status, error_kind, error FROM rollouts WHERE run_id = 'odd-ids'").fetchall()
        trained = {r[0] for r in con.execute("SELECT DISTINCT task_id FROM triplets WHERE run_id = 'odd-ids'").fetchall()}
        spans = {r[0] for r in con.execute("SELECT DISTINCT task_id FROM spans WHERE run_id = 'odd-ids' "
                                           "AND span_kind = 'llm'").fetchall()}
    assert [r for r in rollouts if r[1] != "succeeded" or r[2] is not None] == []
    assert len(rollouts) == 2 * len(ids)
    assert trained == spans == set(ids)  # every group trained, under the id the dataset gave it
    assert result["status"] == "completed" and result["new_version"] == "flowtest-v1"


@pytest.mark.integration
def test_a_registration_the_gateway_refuses_stops_the_run_instead_of_blaming_an_outage(gateway, collector, tmp_path):
    from lightning_core.epoch.failures import RunStopped
    from lightning_core.epoch.stages import run_one_rollout
    from lightning_core.rollouts.runner import RolloutSpec, RunnerSettings

    settings = RunnerSettings(agent="tests.helpers.flow_agent:run", collector_url=collector.url, gateway_url=gateway.url,
                              model="tiny", retries=1, gateway_token=gateway.token)
    spec = RolloutSpec("r", 0, "not a valid/rollout id", "t", "t", 0, {"question": "hi", "target": "x"})
    with pytest.raises(RunStopped, match=r"refused to register rollout .* \(attempt 3\): .*answered 422"):
        run_one_rollout(settings, spec, first_attempt=3)
