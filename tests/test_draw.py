"""Each epoch's draw of training tasks: balanced by a task field (rollouts.balance_by) and the validation split held
out of it (rollouts.validation_tasks), on hand-made datasets; the plain draw unchanged when both are off."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest

from lightning_core.config import load_config
from lightning_core.epoch import bookkeeping as ep
from lightning_core.epoch import draw
from lightning_core.rollouts.dataset import DatasetError, load_tasks
from lightning_core.store.catalog import Catalog


def _hops_dataset(path, *, two=30, three=20):
    """60% hops=2, 40% hops=3 by default, the mix of examples/rag."""
    rows = [{"id": f"h2-{i}", "hops": 2} for i in range(two)] + [{"id": f"h3-{i}", "hops": 3} for i in range(three)]
    random.Random(7).shuffle(rows)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _config(tmp_path, dataset, *extra):
    return load_config(None, overrides=[f"project_dir={tmp_path}", f"rollouts.dataset={dataset}", "run_name=draw",
                                        "rollouts.group_size=1", *extra])


def _hops(tasks):
    return Counter(t["hops"] for t in tasks)


def test_balance_by_hops_draws_half_two_hop_and_half_three_hop_questions_from_a_60_40_set_each_epoch(tmp_path):
    cfg = _config(tmp_path, _hops_dataset(tmp_path / "t.jsonl"), "rollouts.tasks_per_epoch=10", "rollouts.balance_by=hops")
    draws = [draw.epoch_tasks(cfg, epoch=e) for e in range(4)]
    assert [_hops(d) for d in draws] == [Counter({2: 5, 3: 5})] * 4
    assert len({frozenset(t["id"] for t in d) for d in draws}) == 4  # another draw each epoch
    assert [t["id"] for t in draw.epoch_tasks(cfg, epoch=2)] == [t["id"] for t in draws[2]]  # deterministic per epoch
    # an odd count: the extra task goes to one value, picked by the epoch's seed
    odd = _config(tmp_path, cfg.rollouts.dataset, "rollouts.tasks_per_epoch=9", "rollouts.balance_by=hops")
    assert sorted(_hops(draw.epoch_tasks(odd, epoch=0)).values()) == [4, 5]


def test_a_value_with_fewer_tasks_than_its_share_gives_all_it_has_and_the_others_fill_the_draw(tmp_path):
    cfg = _config(tmp_path, _hops_dataset(tmp_path / "t.jsonl", two=30, three=3), "rollouts.tasks_per_epoch=10",
                  "rollouts.balance_by=hops")
    assert _hops(draw.epoch_tasks(cfg, epoch=0)) == Counter({2: 7, 3: 3})
    assert draw.balanced_quotas({"a": 2, "b": 50, "c": 4}, count=12, rng=random.Random(0)) == {"a": 2, "c": 4, "b": 6}
    assert draw.balanced_quotas({"a": 2, "b": 3}, count=9, rng=random.Random(0)) == {"a": 2, "b": 3}  # all there is


def test_with_balance_by_off_the_epoch_draw_is_the_plain_seeded_sample_it_always_was(tmp_path):
    dataset = _hops_dataset(tmp_path / "t.jsonl")
    cfg = _config(tmp_path, dataset, "rollouts.tasks_per_epoch=10", "rollouts.seed=3")
    tasks = load_tasks(dataset)
    for epoch in range(3):  # the draw before balance_by existed: random.Random(seed * 100_003 + epoch).sample
        before = random.Random(3 * 100_003 + epoch).sample(tasks, 10)
        assert draw.epoch_tasks(cfg, epoch=epoch) == before
    catalog = Catalog.from_config(cfg)
    catalog.ensure()
    planned = {s.task_id for s in ep.plan_epoch(cfg, catalog, run_id="draw", epoch=1)}
    assert planned == {t["id"] for t in random.Random(3 * 100_003 + 1).sample(tasks, 10)}
    # dynamic sampling's next round too: random.Random((seed * 100_003 + epoch) * 1_009 + round).sample of the rest
    more = {s.task_id for s in ep.plan_more_tasks(cfg, catalog, run_id="draw", epoch=1, count=4)}
    rest = [t for t in tasks if t["id"] not in planned]
    assert more == {t["id"] for t in random.Random((3 * 100_003 + 1) * 1_009 + 1).sample(rest, 4)}


def test_a_task_without_the_balance_by_field_is_refused_with_its_file_and_line(tmp_path):
    dataset = tmp_path / "t.jsonl"
    dataset.write_text('{"id": "a", "hops": 2}\n\n{"id": "b", "hop": 3}\n')
    cfg = _config(tmp_path, dataset, "rollouts.tasks_per_epoch=1", "rollouts.balance_by=hops")
    with pytest.raises(DatasetError, match=rf"{dataset}:3: task 'b' has no 'hops' field, .*rollouts.balance_by"):
        draw.epoch_tasks(cfg, epoch=0)
    with pytest.raises(ValueError, match="rollouts.balance_by .* set tasks_per_epoch"):
        _config(tmp_path, dataset, "rollouts.balance_by=hops")


def test_the_validation_split_is_held_out_of_every_epochs_draw_and_the_same_for_every_epoch_and_resume(tmp_path):
    cfg = _config(tmp_path, _hops_dataset(tmp_path / "t.jsonl"), "rollouts.tasks_per_epoch=10",
                  "rollouts.validation_tasks=6", "rollouts.balance_by=hops", "rollouts.informative_groups=10")
    split = draw.validation_split(cfg)
    held = {t["id"] for t in split}
    assert len(held) == 6 and _hops(split) == Counter({2: 3, 3: 3})
    assert {t["id"] for t in draw.validation_split(cfg)} == held  # stable: seeded by rollouts.seed alone
    catalog = Catalog.from_config(cfg)
    catalog.ensure()
    for epoch in range(5):
        planned = {s.task_id for s in ep.plan_epoch(cfg, catalog, run_id="draw", epoch=epoch)}
        planned |= {s.task_id for s in ep.plan_more_tasks(cfg, catalog, run_id="draw", epoch=epoch, count=40)}
        assert len(planned) == 44 and not planned & held  # every task but the split, over the rounds
    # a resumed run (a new process: a new config object) plans the same first draw and the same split
    again = _config(tmp_path, cfg.rollouts.dataset, "rollouts.tasks_per_epoch=10", "rollouts.validation_tasks=6",
                    "rollouts.balance_by=hops")
    assert [t["id"] for t in draw.epoch_tasks(again, epoch=3)] == [t["id"] for t in draw.epoch_tasks(cfg, epoch=3)]
    assert {t["id"] for t in draw.validation_split(again)} == held
    with pytest.raises(DatasetError, match=r"validation_tasks \(50\) must be fewer than the 50 tasks"):
        draw.validation_split(_config(tmp_path, cfg.rollouts.dataset, "rollouts.validation_tasks=50"))
    with pytest.raises(ValueError, match="validate_every .* set rollouts.validation_tasks"):
        _config(tmp_path, cfg.rollouts.dataset, "rollouts.validate_every=2")
