"""Baseline: Agent Lightning 0.3.0's trace-to-triplet adapter on the spans of triplets_bench.py.

Runs in its own environment, because Agent Lightning pins its own dependency set:

    python3 -m venv .venv-al
    .venv-al/bin/python -m pip install agentlightning==0.3.0 pyarrow==25.0.1
    .venv-al/bin/python benchmarks/agentlightning_bench.py --lake /tmp/benchlake1m --rollouts 3000

It reads the lake that ``triplets_bench.py`` generated (run ``bench``, epoch 0) and gives each
span the attributes Agent Lightning's own instrumentation would have written: the gateway span is
named ``openai.chat.completion`` and carries ``prompt_token_ids``, ``response_token_ids`` and the
flattened ``gen_ai.prompt.N.*`` / ``gen_ai.completion.0.*`` messages; the reward span carries
``agentlightning.reward.0.value``; agent spans keep ``agent.name``. Then, per rollout, it times
``TracerTraceToTriplet().adapt(spans)`` (tree build, hierarchy repair, call and reward matching,
triplets) with its defaults. Building the ``Span`` objects is not timed: Agent Lightning's store
hands the adapter ready ``Span`` objects. It prints spans/s and checks that every rollout gave
the same six calls that Arclight's pipeline turns into triplets.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import defaultdict
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # litellm (imported by agentlightning): no network

from agentlightning.adapter.triplet import TracerTraceToTriplet  # noqa: E402
from agentlightning.types import Span  # noqa: E402

COLUMNS = ["trace_id", "span_id", "parent_id", "name", "start_ns", "end_ns", "status_code", "attributes",
           "rollout_id", "span_kind", "prompt_token_ids", "response_token_ids"]


def agentlightning_attributes(row: dict) -> tuple[str, dict]:
    """Return the span name and attributes Agent Lightning's instrumentation would have recorded."""
    attributes = json.loads(row["attributes"])
    name = row["name"]
    if row["span_kind"] == "llm":  # the gateway's span: what AL's LLM proxy / OpenAI instrumentation records
        name = "openai.chat.completion"
        attributes["prompt_token_ids"] = row["prompt_token_ids"]
        attributes["response_token_ids"] = row["response_token_ids"]
        for i, message in enumerate(json.loads(attributes.pop("arclight.llm.request_messages", "[]"))):
            attributes[f"gen_ai.prompt.{i}.role"] = message["role"]
            attributes[f"gen_ai.prompt.{i}.content"] = message["content"]
        attributes["gen_ai.completion.0.role"] = "assistant"
        attributes["gen_ai.completion.0.content"] = attributes.pop("arclight.llm.response_text", "")
    elif row["span_kind"] == "reward":
        attributes["agentlightning.reward.0.name"] = attributes.get("arclight.reward.name", "primary")
        attributes["agentlightning.reward.0.value"] = attributes["arclight.reward.value"]
    return name, attributes


def load_rollouts(lake: Path, rollouts: int) -> dict[str, list[Span]]:
    """Return the first ``rollouts`` rollouts of the benchmark's partition as Agent Lightning spans."""
    folder = lake / "spans" / "training" / "run_id=bench" / "epoch=0"
    table = pq.read_table(sorted(folder.glob("*.parquet")), columns=COLUMNS)
    wanted = sorted(set(table["rollout_id"].to_pylist()))[:rollouts]
    table = table.filter(pc.is_in(table["rollout_id"], value_set=pa.array(wanted)))
    grouped: dict[str, list[Span]] = defaultdict(list)
    for row in table.to_pylist():
        name, attributes = agentlightning_attributes(row)
        grouped[row["rollout_id"]].append(Span.from_attributes(
            attributes=attributes, rollout_id=row["rollout_id"], attempt_id="a0", sequence_id=0, name=name,
            trace_id=row["trace_id"], span_id=row["span_id"], parent_id=row["parent_id"],
            start_time=row["start_ns"] / 1e9, end_time=row["end_ns"] / 1e9))
    return grouped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lake", type=Path, default=Path("/tmp/benchlake1m"), help="lake written by triplets_bench.py")
    parser.add_argument("--rollouts", type=int, default=3000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    rollouts = load_rollouts(args.lake, args.rollouts)
    spans = sum(len(s) for s in rollouts.values())
    adapter = TracerTraceToTriplet()
    for i in range(args.repeat):
        triplets = rewarded = with_ids = 0
        started = time.perf_counter()
        for rollout_spans in rollouts.values():
            out = adapter.adapt(rollout_spans)
            triplets += len(out)
            rewarded += sum(t.reward is not None for t in out)
            with_ids += sum(bool(t.prompt["token_ids"]) and bool(t.response["token_ids"]) for t in out)
        seconds = time.perf_counter() - started
        print(f"run {i + 1}: Agent Lightning 0.3.0 adapter: {spans:,} spans of {len(rollouts):,} rollouts -> "
              f"{triplets:,} triplets ({with_ids:,} with token ids, {rewarded:,} with a reward) in {seconds:.2f}s "
              f"= {spans / seconds:,.0f} spans/s")
    if triplets != 6 * len(rollouts):
        raise SystemExit(f"expected 6 calls per rollout, found {triplets / len(rollouts):.2f}: the span mapping is off")


if __name__ == "__main__":
    main()
