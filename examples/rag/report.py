"""What a retrieval run did, read back from its lake with SQL: held-out reward, F1, exact match, searches per
question and grounded answers for every evaluation; the training curve as a plot; and one question that failed
before training and succeeded after, with both trajectories.

    .venv/bin/python examples/rag/report.py examples/rag/.arclight/measure/config-<stamp> [--plot examples/rag/curve-s0.png]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from lightning_core import analyst  # noqa: E402

# one row per rollout: its evaluation (label, dataset, epochs trained before it) or training epoch, and what the
# agent did (the rag.* attributes rag_entry.py sets on the rollout span)
ROLLOUTS = """
WITH outcome AS (
    SELECT rollout_id,
           (attributes->>'rag.searches')::INT AS searches,
           (attributes->>'rag.empty_searches')::INT AS empty_searches,
           (attributes->>'rag.chain_found')::INT AS chain_found,
           (attributes->>'rag.chain_length')::INT AS chain_length,
           (attributes->>'rag.format_ok')::BOOLEAN AS format_ok,
           (attributes->>'rag.grounded')::BOOLEAN AS grounded,
           (attributes->>'rag.f1')::DOUBLE AS f1,
           (attributes->>'rag.exact_match')::BOOLEAN AS exact_match,
           attributes->>'rag.source' AS source  -- rag_teach.py: oracle or sample (NULL: the agent alone)
    FROM spans WHERE attributes->>'rag.searches' IS NOT NULL
)
SELECT r.run_id, r.epoch, r.mode, r.rollout_id, r.task_id, r.reward,
       e.policy_version AS label, (e.stats->>'after_epochs')::INT AS after_epochs,
       regexp_extract(e.stats->>'dataset', '[^/]+$') AS dataset,
       o.* EXCLUDE (rollout_id)
FROM rollouts r JOIN outcome o USING (rollout_id) LEFT JOIN epochs e ON e.run_id = r.run_id AND e.epoch = r.epoch
WHERE r.status = 'succeeded'
"""

SUMMARY = """
SELECT {key}, count(*) AS questions, avg(reward) AS reward, avg(f1) AS f1, avg(exact_match::INT) AS exact_match,
       avg(format_ok::INT) AS format_ok, avg(searches) AS searches, avg(empty_searches) AS empty_searches,
       avg(chain_found / chain_length) AS chain_docs_found, avg(grounded::INT) AS grounded
FROM rag WHERE mode = '{mode}' GROUP BY ALL ORDER BY ALL
"""

# what each source of a warm-start epoch (rag_teach.py) gave: its rollouts and calls, and those SFT kept (reward at
# least the run's trainer.sft_min_reward, as the trainer selects them)
SOURCES = """
WITH run AS (SELECT coalesce((config->'trainer'->>'sft_min_reward')::DOUBLE, 1.0) AS min_reward FROM runs
             WHERE run_id = (SELECT min(run_id) FROM rollouts WHERE mode = 'train'))
SELECT r.epoch, r.source, count(DISTINCT r.rollout_id) AS rollouts,
       count(DISTINCT r.rollout_id) FILTER (WHERE r.reward >= run.min_reward) AS rollouts_kept,
       count(t.span_id) AS calls, count(t.span_id) FILTER (WHERE t.reward >= run.min_reward) AS calls_kept,
       avg(r.searches) AS searches, avg(r.chain_found / r.chain_length) AS chain_docs_found
FROM rag r CROSS JOIN run LEFT JOIN triplets t ON t.rollout_id = r.rollout_id AND t.run_id = r.run_id
WHERE r.mode = 'train' AND r.source IS NOT NULL GROUP BY ALL ORDER BY ALL
"""

# each evaluation by the number of hops (the chain's length): whether the policy searches as often as the question needs
BY_HOPS = """
SELECT label, dataset, chain_length AS hops, count(*) AS questions, avg(reward) AS reward, avg(f1) AS f1,
       avg(searches) AS searches, avg(chain_found / chain_length) AS chain_docs_found
FROM rag WHERE mode = 'eval' GROUP BY ALL ORDER BY dataset, min(after_epochs), label, hops
"""

# the model's calls and the tools' results of one rollout, in order
TRAJECTORY = """
SELECT name, coalesce(attributes->>'arclight.llm.response_tool_calls', attributes->>'arclight.llm.response_text') AS reply,
       attributes->>'output.value' AS tool_output, status_code
FROM spans WHERE rollout_id = ? AND (name IN ('search', 'answer') OR span_kind = 'llm') ORDER BY start_ns
"""


def table(rows: list[tuple], columns: list[str]) -> str:
    def cell(v):
        return f"{v:.3f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join([*lines, *("| " + " | ".join(cell(v) for v in row) + " |" for row in rows)])


SPLITS = """
SELECT dataset, after_epochs, avg(reward), avg(f1), avg(exact_match::INT)
FROM rag WHERE mode = 'eval' GROUP BY ALL ORDER BY ALL
"""


def before_after(points: list[tuple], after: int | None) -> list[tuple]:
    """(dataset, epochs, reward, F1 and exact match before, then after) per held-out split, from ``SPLITS`` rows:
    before is the evaluation after 0 epochs, after the one after ``after`` epochs (default: the last); a split
    with no evaluation then is left out."""
    rows = []
    for dataset in sorted({p[0] for p in points}):
        by_epochs = {p[1]: p[2:] for p in points if p[0] == dataset}
        last = max(by_epochs) if after is None else after
        if 0 in by_epochs and last in by_epochs and last > 0:
            (r0, f0, e0), (r1, f1_, e1) = by_epochs[0], by_epochs[last]
            rows.append((dataset, last, r0, r1, f0, f1_, e0, e1))
    return rows


def report(project: Path) -> tuple[str, list[tuple], list[tuple], list[tuple]]:
    """Print one project's evaluations, training epochs and before/after question; return its run's name, its
    evaluation and training rows and its held-out splits' averages per evaluation (``SPLITS``)."""
    lake = project / ".arclight" / "lake"
    if not lake.is_dir():
        sys.exit(f"error: {project} has no lake ({lake}): pass a measured project's folder, "
                 "examples/rag/.arclight/measure/config-<stamp>")
    con = analyst.connect(lake)
    con.execute(f"CREATE TEMP TABLE rag AS {ROLLOUTS}")
    run = con.execute("SELECT min(run_id) FROM rollouts WHERE mode = 'train'").fetchone()[0] or project.name
    print(f"# {run} ({project.name})\n")

    key = "label, after_epochs, dataset"
    evals = con.execute(SUMMARY.format(key=key, mode="eval")).fetchall()
    columns = [d[0] for d in con.description]
    print("## Held-out evaluations (greedy)\n")
    print(table(evals, columns))
    hops = con.execute(BY_HOPS).fetchall()
    if len({row[2] for row in hops}) > 1:
        print("\n## Held-out evaluations by hops\n")
        print(table(hops, [d[0] for d in con.description]))
    train = con.execute(SUMMARY.format(key="epoch", mode="train")).fetchall()
    print("\n## Training rollouts per epoch (sampled)\n")
    print(table(train, [d[0] for d in con.description]))
    sources = con.execute(SOURCES).fetchall()
    if sources:
        print("\n## What each source gave the warm-start (SFT) epochs\n")
        print(table(sources, [d[0] for d in con.description]))

    # a held-out question that failed before training (base) and succeeded after (the last evaluation of the same
    # split): one answered exactly after and with F1 0 before first, from the 2- and 3-hop split when one there was
    pair = con.execute("""
        WITH evals AS (SELECT *, min(after_epochs) OVER split AS first_epochs, max(after_epochs) OVER split AS last_epochs
                       FROM rag WHERE mode = 'eval' WINDOW split AS (PARTITION BY dataset)),
             first AS (SELECT * FROM evals WHERE after_epochs = first_epochs),
             last AS (SELECT * FROM evals WHERE after_epochs = last_epochs)
        SELECT f.task_id, f.rollout_id, l.rollout_id, f.reward, l.reward
        FROM first f JOIN last l USING (task_id, dataset) WHERE l.reward > f.reward
        ORDER BY l.exact_match AND f.f1 = 0 DESC,
                 CASE f.dataset WHEN 'test.jsonl' THEN 0 WHEN 'test_reworded.jsonl' THEN 1 ELSE 2 END,
                 l.reward - f.reward DESC, task_id
        LIMIT 1""").fetchall()
    if pair:
        task_id, before, after, r0, r1 = pair[0]
        question = con.execute("SELECT task FROM rollouts WHERE rollout_id = ?", [before]).fetchone()[0]
        print(f"\n## One question before and after training\n\n`{json.loads(question)['question']}` "
              f"(gold: {json.loads(question)['answer']}); reward {r0:.2f} -> {r1:.2f}\n")
        for title, rollout in (("before", before), ("after", after)):
            print(f"{title}:\n")
            for name, reply, output, status in con.execute(TRAJECTORY, [rollout]).fetchall():
                text = reply if reply is not None else output
                print(f"- {name}{' (failed)' if status == 'ERROR' else ''}: {str(text)[:300]!s}")
            print()

    return run, evals, train, con.execute(SPLITS).fetchall()


def spread(values: list[float]) -> str:
    """``mean ± sample standard deviation`` (the mean alone for one value)."""
    mean = statistics.fmean(values)
    return f"{mean:.3f}" if len(values) < 2 else f"{mean:.3f} ± {statistics.stdev(values):.3f}"


def rows(project: Path, sql: str) -> list[dict]:
    """``sql`` (over the ``rag`` table of ``ROLLOUTS``) on ``project``'s lake, as dicts."""
    con = analyst.connect(project / ".arclight" / "lake")
    con.execute(f"CREATE TEMP TABLE rag AS {ROLLOUTS}")
    result = con.execute(sql)
    columns = [d[0] for d in result.description]
    return [dict(zip(columns, row)) for row in result.fetchall()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("projects", type=Path, nargs="+",
                        help="measured projects' folders (each with its .arclight/lake); several: one per seed")
    parser.add_argument("--plot", type=Path, default=None, help="write the training and held-out curves here (PNG)")
    parser.add_argument("--after", type=int, default=None,
                        help="compare with the evaluation after this many epochs (default: each project's last)")
    args = parser.parse_args()
    runs = []
    for project in args.projects:
        run, evals, train, points = report(project)
        runs.append((run, evals, train, before_after(points, args.after)))
    columns = ["dataset", "epochs", "reward_before", "reward_after", "f1_before", "f1_after", "em_before", "em_after"]
    print("\n## Before and after, per run\n")
    print(table([(name, *row) for name, _, _, rows in runs for row in rows], ["run", *columns]))
    if len(runs) > 1:
        datasets = sorted({row[0] for _, _, _, rows in runs for row in rows})
        means = []
        for dataset in datasets:
            rows = [row for _, _, _, rs in runs for row in rs if row[0] == dataset]
            means.append((dataset, len(rows), *(spread([r[i] for r in rows]) for i in range(2, 8))))
        print(f"\n## Mean over the {len(runs)} runs, ± their sample standard deviation\n")
        print(table(means, ["dataset", "runs", *columns[2:]]))

    if args.plot is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
        for name, evals, train, _ in runs:
            tag = f"{name}: " if len(runs) > 1 else ""
            epochs = [row[0] for row in train]
            left.plot(epochs, [row[2] for row in train], marker="o", label=f"{tag}reward")
            if len(runs) == 1:
                left.plot(epochs, [row[3] for row in train], marker="o", label="F1")
                left.plot(epochs, [row[8] for row in train], marker="o", label="chain documents found")
            for dataset in sorted({row[2] for row in evals}):
                points = sorted({row[1]: (row[4], row[5]) for row in evals if row[2] == dataset}.items())
                right.plot([p[0] for p in points], [p[1][0] for p in points], marker="o", label=f"{tag}{dataset} reward")
                if len(runs) == 1:
                    right.plot([p[0] for p in points], [p[1][1] for p in points], marker="x", linestyle="--",
                               label=f"{dataset} F1")
        left.set(title="training rollouts (sampled)", xlabel="epoch", ylim=(0, 1))
        left.legend(fontsize="small")
        right.set(title="held-out (greedy)", xlabel="epochs trained", ylim=(0, 1))
        right.legend(fontsize="small")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)
        print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()
