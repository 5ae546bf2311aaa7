"""Silence is not data: say loudly when a run's spans yield no LLM call, or calls but no reward.

After the pipeline's shared stages, ``find_silences`` picks the rollouts whose spans gave no
recognisable LLM call (flag ``no_calls``) or whose calls got no reward (flag ``no_reward``) --
``sql/silent_rollouts.sql`` -- and lists the span names and attribute keys those rollouts hold
(``sql/span_shapes.sql``), so a person sees which convention their instrumentation misses.
``arclight triplets`` and the train summary print the messages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lightning_core.store.catalog import Catalog

CONVENTIONS_DOC = "docs/span-conventions.md"
SHAPES_SHOWN = 12  # span names listed per message
KEYS_SHOWN = 24  # attribute keys listed per span name


@dataclass
class SpanShape:
    """A span name seen in silent rollouts: how many spans had it and the attribute keys they carry."""

    name: str
    spans: int
    attribute_keys: list[str]

    def describe(self) -> str:
        """Return one line: name, count and (up to KEYS_SHOWN) attribute keys."""
        keys = self.attribute_keys[:KEYS_SHOWN]
        more = f", ... (+{len(self.attribute_keys) - len(keys)})" if len(self.attribute_keys) > len(keys) else ""
        return f"{self.name!r} x{self.spans}: {', '.join(keys) or '(no attributes)'}{more}"


@dataclass
class Silence:
    """Rollouts of one run whose spans gave no LLM call (``no_calls``) or no reward (``no_reward``)."""

    kind: str
    rollouts: list[str]
    of_rollouts: int
    spans: int = 0
    calls: int = 0
    missing_rewards: int = 0
    shapes: list[SpanShape] = field(default_factory=list)

    def message(self, *, missing_reward: float | None = None) -> str:
        """Return the warning, with the span names and keys seen and where the conventions are."""
        some = ", ".join(self.rollouts[:3]) + (", ..." if len(self.rollouts) > 3 else "")
        if self.kind == "no_calls":
            head = (f"no LLM call recognised in {len(self.rollouts)} of {self.of_rollouts} rollouts ({some}): "
                    f"their {self.spans} spans give no training data.")
            hint = (f"LLM calls are recognised by the attributes listed in {CONVENTIONS_DOC} (gateway spans, "
                    "gen_ai.operation.name=chat, openinference.span.kind=LLM, llm.request.type=chat, token-id "
                    "arrays ...); pipeline.llm_call_match adds a regex on span names.")
        else:
            fallback = "" if missing_reward is None else f" = {missing_reward:g}"
            valueless = f"; {self.missing_rewards} reward spans had no value" if self.missing_rewards else ""
            head = (f"no reward in {len(self.rollouts)} of {self.of_rollouts} rollouts ({some}): their "
                    f"{self.calls} calls have reward NULL and the flag no_reward, and each rollout's return is "
                    f"pipeline.missing_reward{fallback}{valueless}.")
            hint = (f"a reward is a span with arclight.reward.value (or another reward convention in "
                    f"{CONVENTIONS_DOC}: emit_reward, agentlightning.reward.0.value, AgentOps reward output).")
        lines = [head, "  spans seen (name xcount: attribute keys):"]
        lines += [f"    {shape.describe()}" for shape in self.shapes[:SHAPES_SHOWN]]
        if len(self.shapes) > SHAPES_SHOWN:
            lines.append(f"    ... and {len(self.shapes) - SHAPES_SHOWN} more span names")
        lines.append(f"  {hint}")
        return "\n".join(lines)


def find_silences(con: Any, *, run_id: str | None, epoch: int | None) -> list[Silence]:
    """Return the silent rollouts of (run_id, epoch) on ``con``, which holds ``rollout_summary`` and ``spans_raw``."""
    from lightning_core.pipeline.steps import run_stage

    rows = run_stage(con, "silent_rollouts", params={"run_id": run_id, "epoch": epoch}).to_arrow_table().to_pylist()
    silences = []
    for kind in ("no_calls", "no_reward"):
        chosen = [r for r in rows if r["silence"] == kind]
        if not chosen:
            continue
        groups = sorted({r["grp"] for r in chosen})
        shapes = run_stage(con, "span_shapes", params={"run_id": run_id, "epoch": epoch, "groups": groups})
        silences.append(Silence(
            kind=kind, rollouts=[r["rollout_id"] or r["grp"] for r in chosen], of_rollouts=chosen[0]["of_rollouts"],
            spans=sum(r["spans"] for r in chosen), calls=sum(r["calls"] for r in chosen),
            missing_rewards=sum(r["missing_rewards"] for r in chosen),
            shapes=[SpanShape(**s) for s in shapes.to_arrow_table().to_pylist()]))
    return silences


def print_silences(silences: list[Silence], *, console: Any, missing_reward: float | None = None) -> None:
    """Print one ``warning:`` per silence on a rich console (span names are printed as text, not markup)."""
    from rich.text import Text

    for silence in silences:
        console.print(Text("warning: ", style="bold yellow") + Text(silence.message(missing_reward=missing_reward)))


def catalog_silences(catalog: Catalog, *, run_id: str | None, epoch: int | None = None) -> list[Silence]:
    """Return the silent rollouts of a run as the catalog's views hold them (what the last pipeline run wrote)."""
    with catalog.read() as con:
        return find_silences(con, run_id=run_id, epoch=epoch)
