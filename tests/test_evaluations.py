"""What makes two held-out evaluations the same one: the versions serving (the label), and the held-out file they ran
on (its path, the sha256 of its bytes, the task cap). Unit level: a real catalog in a temporary folder, no servers."""

from __future__ import annotations

import json

from lightning_core.epoch import reports
from lightning_core.store.catalog import Catalog
from tests.conftest import make_config


def _write(path, prefix: str, questions: list[str]) -> str:
    path.write_text("".join(json.dumps({"id": f"{prefix}-{i:04d}", "question": q, "answer": i}) + "\n"
                            for i, q in enumerate(questions)))
    return str(path)


def test_an_evaluation_is_reused_only_on_the_same_held_out_file_with_the_same_contents(tmp_path):
    test = _write(tmp_path / "test.jsonl", "test", ["Chloe has 4 boxes with 4 apples each.", "Jon had 10 stickers."])
    reworded = _write(tmp_path / "test_reworded.jsonl", "reph", ["A bakery fills 4 trays of 4 muffins.", "Omar has 10."])
    on_test, on_reworded = (make_config(tmp_path, f"rollouts.eval_dataset={p}") for p in (test, reworded))
    catalog = Catalog.from_config(on_test)
    catalog.ensure()
    serving = {"calc": "calc-v16"}
    label = reports.eval_label(on_test, serving)
    assert label == reports.eval_label(on_reworded, serving) == "calc-v16"  # the label names the versions, no more

    identity = reports.eval_dataset(on_test)
    assert identity == reports.eval_dataset(on_test)  # the same file read twice: the same evaluation
    assert identity["dataset"] == test and identity != reports.eval_dataset(on_reworded)
    first = reports.eval_epoch(catalog, run_id="calc-1.eval", label=label, dataset=identity)
    assert reports.eval_epoch(catalog, run_id="calc-1.eval", label=label, dataset=reports.eval_dataset(on_test)) == first
    other = reports.eval_epoch(catalog, run_id="calc-1.eval", label=label, dataset=reports.eval_dataset(on_reworded))
    assert other != first  # another file: its own evaluation, not the first one's result

    # the same path with other contents (the file regenerated) is another evaluation too
    _write(tmp_path / "test.jsonl", "test", ["Chloe has 5 boxes with 4 apples each.", "Jon had 10 stickers."])
    changed = reports.eval_dataset(on_test)
    assert changed["dataset"] == identity["dataset"] and changed["dataset_sha256"] != identity["dataset_sha256"]
    assert reports.eval_epoch(catalog, run_id="calc-1.eval", label=label, dataset=changed) not in (first, other)

    # and so is a cap on the tasks evaluated (rollouts.eval_tasks, or the train flow's evaluation.tasks)
    capped = reports.eval_dataset(make_config(tmp_path, f"rollouts.eval_dataset={test}", "rollouts.eval_tasks=1"))
    assert capped != changed and reports.eval_dataset(on_test, tasks=1) == capped
    with catalog.read(spans=False) as con:
        assert con.execute("SELECT count(*) FROM epochs WHERE run_id = 'calc-1.eval'").fetchall()[0][0] == 3


def test_an_evaluation_recorded_before_the_files_identity_was_kept_is_run_once_more(tmp_path):
    from lightning_core.epoch import bookkeeping as ep

    test = _write(tmp_path / "test.jsonl", "test", ["Chloe has 4 boxes with 4 apples each."])
    cfg = make_config(tmp_path, f"rollouts.eval_dataset={test}")
    catalog = Catalog.from_config(cfg)
    catalog.ensure()
    # what an older lake holds: the label, and the path record_eval wrote after the run, but no sha256 or task cap
    ep.set_epoch_status(catalog, run_id="calc-1.eval", epoch=0, status="completed", policy_version="calc-v16",
                        stats={"after_epochs": 16, "dataset": test})
    again = reports.eval_epoch(catalog, run_id="calc-1.eval", label="calc-v16", dataset=reports.eval_dataset(cfg))
    assert again == 1  # its file's contents are unknown, so it is not taken for this one: a new evaluation runs
    assert reports.eval_epoch(catalog, run_id="calc-1.eval", label="calc-v16", dataset=reports.eval_dataset(cfg)) == 1
