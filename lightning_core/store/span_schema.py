"""The span table's columns and partitions: one row per span, two lanes (training by run and epoch, production by
date), the attributes promoted to typed columns at ingest, and the empty typed files that let views bind on an
empty lake."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq



from lightning_core import semconv
from lightning_core.store.delta import owner


LANES = {"training": ("run_id", "epoch"), "production": ("date",)}  # lane -> Delta partition columns


PARTITION_TYPES = {"run_id": pa.string(), "epoch": pa.int64(), "date": pa.string()}


def lane_of(partition: Partition) -> str:
    return "production" if partition.run_id is None else "training"


def partition_fields(partition: Partition) -> dict[str, Any]:
    """The lane's partition columns and their values (the Partition's fields of the same names)."""
    return {column: getattr(partition, column) for column in LANES[lane_of(partition)]}


def with_partition_columns(table: pa.Table, partition: Partition) -> pa.Table:
    for column, value in partition_fields(partition).items():
        table = table.append_column(pa.field(column, PARTITION_TYPES[column]),
                                    pa.array([value] * table.num_rows, PARTITION_TYPES[column]))
    return table


def table_schema(lane: str) -> pa.Schema:
    """The Delta table's schema: the span columns plus the lane's partition columns."""
    schema = SPAN_SCHEMA
    for column in LANES[lane]:
        schema = schema.append(pa.field(column, PARTITION_TYPES[column]))
    return schema


SCHEMA_RUN = "_schema"


def schema_file(root: str | os.PathLike[str], lane: str) -> Path:
    """An empty file of the lane's columns, outside its table, so a view over no spans still binds."""
    folder = Path(root) / "_schema" / lane / ("run_id=_schema/epoch=-1" if lane == "training" else "date=1970-01-01")
    return folder / "part-0-schema.parquet"


def ensure_schema_files(root: Path) -> None:
    """Place an empty file of the current ``SPAN_SCHEMA`` per lane so views work on an empty lake."""
    for lane in LANES:
        target = schema_file(root, lane)
        if not target.exists() or not pq.read_schema(target).equals(SPAN_SCHEMA, check_metadata=False):
            target.parent.mkdir(parents=True, exist_ok=True)
            _write_empty(target)


def _write_empty(target: Path) -> None:
    tmp = target.with_name(f".{target.name}.{owner()}.tmp")
    pq.write_table(SPAN_SCHEMA.empty_table(), tmp)
    os.replace(tmp, target)


SPAN_SCHEMA = pa.schema(
    [
        ("trace_id", pa.string()),
        ("span_id", pa.string()),
        ("parent_id", pa.string()),
        ("name", pa.string()),
        ("kind", pa.string()),
        ("start_ns", pa.int64()),
        ("end_ns", pa.int64()),
        ("status_code", pa.string()),
        ("status_message", pa.string()),
        ("attributes", pa.string()),  # JSON object, key order as sent
        ("events", pa.string()),  # JSON list of {name, time_ns, attributes}
        ("links", pa.string()),  # JSON list of {trace_id, span_id, attributes}
        ("resource", pa.string()),  # JSON object of resource attributes
        ("scope_name", pa.string()),
        ("scope_version", pa.string()),
        ("service_name", pa.string()),
        ("rollout_id", pa.string()),
        ("task_id", pa.string()),
        ("attempt", pa.int64()),
        ("received_ns", pa.int64()),
        # Promoted at ingest (``promoted_columns``): copies of the keys every query filters on...
        ("span_kind", pa.string()),  # arclight.span.kind
        ("agent_name", pa.string()),  # agent.name
        ("response_id", pa.string()),  # gen_ai.response.id
        ("reward_value", pa.float64()),  # arclight.reward.value (else agentlightning.reward.0.value)
        # ...and the gateway's training arrays, moved out of ``attributes`` and stored only here.
        ("prompt_token_ids", pa.list_(pa.int64())),  # arclight.llm.prompt_token_ids
        ("response_token_ids", pa.list_(pa.int64())),  # arclight.llm.response_token_ids
        ("response_logprobs", pa.list_(pa.float64())),  # arclight.llm.response_logprobs
    ]
)


# attribute key -> column, for the keys copied to a text column (and kept in the attributes JSON)
PROMOTED_STRINGS = {semconv.SPAN_KIND: "span_kind", semconv.AGENT_NAME: "agent_name", semconv.GEN_AI_RESPONSE_ID: "response_id"}


# attribute key -> (column, element type, allowed range or None); these keys leave the attributes
# JSON at ingest. Token ids must fit 32 bits: the triplets store them as INTEGER[] (sql/llm_spans.sql).
TOKEN_ID_RANGE = (0, 2**31 - 1)


PROMOTED_ARRAYS = {
    semconv.PROMPT_TOKEN_IDS: ("prompt_token_ids", int, TOKEN_ID_RANGE),
    semconv.RESPONSE_TOKEN_IDS: ("response_token_ids", int, TOKEN_ID_RANGE),
    semconv.RESPONSE_LOGPROBS: ("response_logprobs", float, None),
}


@dataclass(frozen=True)
class Partition:
    """One lake folder: a training (run, epoch) or a production date."""

    run_id: str | None
    epoch: int | None
    date: str | None = None

    def relative_dir(self) -> Path:
        """Return this partition's folder relative to the lake root."""
        if self.run_id is None:
            return Path("spans", "production", f"date={self.date}")
        return Path("spans", "training", f"run_id={self.run_id}", f"epoch={self.epoch}")
