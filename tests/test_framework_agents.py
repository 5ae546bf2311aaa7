"""Real AutoGen and CrewAI agents as ``rollouts.command`` programs (issue 44), through the real gateway and collector.

The frameworks do not install beside the project's dependencies, so they live in ``.venv-agents``
(``scripts/setup_agents.sh``) and the agents (``tests/framework_agents/``) run through the runner's own
``rollouts.command`` path (``run_rollout``): separate processes told everything through the
environment (docs/agents.md) and the task on standard input, their reward their last line of output.
Each case has its own run id; per case: one triplet per model call the gateway recorded, with its
exact token ids, the reward, and the agent that owns each call (also in the ``llm_calls`` view), and
``agent_match`` selecting only one agent's calls. The span tree of each case is written to
``$ARCLIGHT_FW_SPANS_DIR`` (default /tmp/fw_spans/<case>.txt) for people reading the shapes.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from lightning_core.pipeline.triplets import materialize_triplets
from lightning_core.rollouts.runner import SUCCEEDED, RolloutSpec, RunnerSettings, flush_outcome_spans, run_rollout
from lightning_core.serving.client import GatewayClient
from lightning_core.store.catalog import Catalog
from lightning_core.store.outputs import load_triplets
from tests.helpers.tokens import gateway_tokens

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
AGENTS_PYTHON = REPO / ".venv-agents" / "bin" / "python"
AGENTS_DIR = REPO / "tests" / "framework_agents"
SPANS_DIR = Path(os.environ.get("ARCLIGHT_FW_SPANS_DIR", "/tmp/fw_spans"))
EPOCH = 0
AGENT_TIMEOUT_S = 180

# the group chat manager of a SelectorGroupChat owns the selector's calls; AutoGen names its agent type
# "SelectorGroupChatManager_<team uuid>": the agent name must be the stable part
SELECTOR_MANAGER = "SelectorGroupChatManager"


@dataclass(frozen=True)
class Case:
    id: str
    program: str
    args: tuple[str, ...]
    agents: tuple[str, ...]  # the agent of each agent turn, in order (calls of other agents, if any, come first)
    match: str  # the one agent agent_match selects
    selects: bool = False  # a selector team: the model picks the speaker, in calls of its own before the agents'
    manager: str | None = None  # the agent owning the selector's calls (None: no agent span encloses them)
    reward: float = 0.75


CASES = [
    Case("autogen-round_robin-native", "autogen_team.py", ("--team", "round_robin", "--tracing", "native"),
         ("solver", "reviewer", "solver"), "solver"),
    Case("autogen-round_robin-openinference", "autogen_team.py", ("--team", "round_robin", "--tracing", "openinference"),
         ("solver", "reviewer", "solver"), "solver"),
    Case("autogen-selector-native", "autogen_team.py", ("--team", "selector", "--tracing", "native"),
         ("solver", "reviewer", "solver"), "solver", selects=True, manager=SELECTOR_MANAGER),
    # OpenInference alone puts the selector's calls straight under the team's CHAIN span (SelectorGroupChat.run_stream):
    # no agent span names who made them, so they belong to no agent (and no anchored agent_match selects them)
    Case("autogen-selector-openinference", "autogen_team.py", ("--team", "selector", "--tracing", "openinference"),
         ("solver", "reviewer", "solver"), "solver", selects=True, manager=None),
    # both, as a user who sets the global provider and instruments gets: AutoGen's names win over the method spans
    Case("autogen-selector-native+openinference", "autogen_team.py",
         ("--team", "selector", "--tracing", "native+openinference"),
         ("solver", "reviewer", "solver"), "solver", selects=True, manager=SELECTOR_MANAGER),
    Case("crewai-openinference", "crewai_crew.py", ("--tracing", "openinference"),
         ("Question planner", "Arithmetic solver"), "Arithmetic solver"),
    Case("crewai-openinference-events", "crewai_crew.py", ("--tracing", "openinference-events"),
         ("Question planner", "Arithmetic solver"), "Arithmetic solver"),
    Case("crewai-openllmetry", "crewai_crew.py", ("--tracing", "openllmetry"),
         ("Question planner", "Arithmetic solver"), "Arithmetic solver"),
]


@dataclass
class Outcome:
    """What one case produced: the program's output, the gateway's record and the pipeline's results."""

    case: Case
    run_id: str
    reward: float | None
    speakers: list[str] | None
    seconds: float
    recorded: dict[str, tuple[list[int], list[int]]]
    llm_calls: int
    triplets: list[dict]
    calls_view: list[dict]
    matched: list[dict]
    extra: dict = field(default_factory=dict)


@pytest.fixture(scope="module")
def agents_python() -> Path:
    if not AGENTS_PYTHON.is_file():
        pytest.fail("the agents' virtualenv is missing: run `make setup` (scripts/setup_agents.sh builds it)")
    return AGENTS_PYTHON


@pytest.fixture(scope="module")
def admin(gateway) -> GatewayClient:
    return GatewayClient(gateway.url, token=gateway.token)


def calls_view(collector_config, run_id: str) -> list[dict]:
    with Catalog.from_config(collector_config).read() as con:
        cursor = con.execute("SELECT response_id, span_count, agent_name, flags FROM llm_calls WHERE run_id = ? "
                             "ORDER BY start_ns", [run_id])
        columns = [d[0] for d in cursor.description]
        return [dict(zip(columns, row)) for row in cursor.fetchall()]


AGENT_KEYS = re.compile(r"^(gen_ai\.agent\.|gen_ai\.operation\.name$|graph\.node\.|openinference\.span\.kind$|"
                        r"recipient_agent_type$|sender_agent_type$|agent\.name$|arclight\.span\.kind$|"
                        r"arclight\.reward\.value$|traceloop\.|crewai\.|gen_ai\.response\.id$|messaging\.|"
                        r"llm\.model_name$|gen_ai\.request\.model$|gen_ai\.system$|gen_ai\.provider\.name$)")


def dump_span_tree(collector_config, run_id: str, path: Path) -> None:
    """Write the run's span tree: each span's name, ids and its agent-like attributes (long values cut)."""
    with Catalog.from_config(collector_config).read() as con:
        rows = con.execute("SELECT name, span_id, parent_id, attributes, start_ns FROM spans WHERE run_id = ? "
                           "ORDER BY start_ns", [run_id]).fetchall()
    spans = {row[1]: row for row in rows}
    children: dict[str | None, list] = {}
    for row in rows:
        children.setdefault(row[2] if row[2] in spans else None, []).append(row)
    lines: list[str] = []

    def walk(row, depth: int) -> None:
        name, span_id, parent_id, attributes, _ = row
        attrs = json.loads(attributes) if isinstance(attributes, str) else (attributes or {})
        shown = {k: (v if len(str(v)) <= 120 else f"{str(v)[:117]}...") for k, v in sorted(attrs.items()) if AGENT_KEYS.match(k)}
        parent = "root" if parent_id in (None, "") else f"parent={parent_id}" + ("" if parent_id in spans else " (not in the run)")
        lines.append(f"{'  ' * depth}- {name} [{span_id}] {parent} {json.dumps(shown, default=str)}")
        for child in children.get(span_id, []):
            walk(child, depth + 1)

    for root in children.get(None, []):
        walk(root, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


_outcomes: dict[str, Outcome] = {}


@pytest.fixture(scope="module")
def run_case(agents_python, admin, gateway, collector, collector_config, tmp_path_factory):
    """Run a case once per module (its tests share the result)."""
    tmp = tmp_path_factory.mktemp("framework-agents")

    def run(case: Case) -> Outcome:
        if case.id in _outcomes:
            return _outcomes[case.id]
        run_id = f"fw-cmd-{case.id.replace('+', '-')}"
        rollout_id = f"{run_id}-r0"
        report_file = tmp / f"{run_id}.json"
        spec = RolloutSpec(run_id, EPOCH, rollout_id, f"task-{run_id}", f"task-{run_id}", 0,
                           {"question": "What is 2 + 3?", "reward": case.reward, "report_file": str(report_file)})
        settings = RunnerSettings(agent=None, collector_url=collector.url, gateway_url=gateway.url, model="tiny",
                                  command=(str(agents_python), str(AGENTS_DIR / case.program), *case.args),
                                  command_cwd=str(REPO), timeout_s=AGENT_TIMEOUT_S)
        started = time.monotonic()
        done = run_rollout(settings, spec, before_attempt=lambda attempt: admin.register_rollout(
            rollout_id=rollout_id, run_id=run_id, epoch=EPOCH, task_id=spec.task_id, attempt=attempt))
        seconds = time.monotonic() - started
        assert flush_outcome_spans(run_id=run_id, epoch=EPOCH) and admin.flush(), "spans were not exported"
        assert (done.status, done.error) == (SUCCEEDED, None), f"{case.program} failed:\n{done.error}"
        dump_span_tree(collector_config, run_id, SPANS_DIR / f"{case.id}.txt")
        report = materialize_triplets(collector_config, run_id=run_id, epoch=EPOCH)
        triplets = load_triplets(collector_config, run_id=run_id, epoch=EPOCH, policy="default").to_pylist()
        view = calls_view(collector_config, run_id)
        recorded = gateway_tokens(collector_config, run_id)
        materialize_triplets(collector_config, run_id=run_id, epoch=EPOCH, agent_match=f"^{re.escape(case.match)}$")
        matched = load_triplets(collector_config, run_id=run_id, epoch=EPOCH, policy="default").to_pylist()
        speakers = json.loads(report_file.read_text())["speakers"] if report_file.exists() else None
        outcome = Outcome(case, run_id, done.reward, speakers, seconds, recorded, report.llm_calls, triplets, view,
                          matched, extra={"rewards": report.rewards, "agents": report.agents, "silences": report.silences})
        _outcomes[case.id] = outcome
        return outcome

    return run


def agent_turns(outcome: Outcome) -> list[str]:
    """The agents that spoke, in order: as the AutoGen program reports them (a selector could pick another
    order), else the case's."""
    if outcome.speakers is not None:
        return [name for name in outcome.speakers if name != "user"]
    return list(outcome.case.agents)


def expected_names(outcome: Outcome) -> list[str | None]:
    """The owner of each call in time order: the selector's calls before the agents' turns (only the first turn
    has two candidates to choose from)."""
    case, turns = outcome.case, agent_turns(outcome)
    extra = len(outcome.recorded) - len(turns)
    return [case.manager] * extra + turns if case.selects else turns


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_command_agent_gives_one_triplet_per_gateway_call_with_its_token_ids_and_reward(case, run_case):
    outcome = run_case(case)
    assert outcome.reward == case.reward  # printed as the program's last line; the runner recorded it
    assert len(agent_turns(outcome)) == len(case.agents)
    if not case.selects:
        assert len(outcome.recorded) == len(case.agents)  # one call per agent turn
    else:
        assert len(case.agents) < len(outcome.recorded) <= len(case.agents) + 3  # + the selector's 1-3 attempts
    assert outcome.llm_calls == len(outcome.recorded)
    assert sorted(t["response_id"] for t in outcome.triplets) == sorted(outcome.recorded)
    for t in outcome.triplets:
        assert (t["prompt_token_ids"], t["response_token_ids"]) == outcome.recorded[t["response_id"]]
        assert t["reward"] == case.reward and t["rollout_return"] == case.reward
        assert "missing_token_ids" not in t["flags"] and "no_reward" not in t["flags"]
    assert outcome.extra["rewards"] == 1 and outcome.extra["silences"] == []
    assert sorted(c["response_id"] for c in outcome.calls_view) == sorted(outcome.recorded)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_command_agent_calls_are_owned_by_the_framework_agents(case, run_case):
    outcome = run_case(case)
    names = expected_names(outcome)
    assert [t["agent_name"] for t in sorted(outcome.triplets, key=lambda t: t["turn_index"])] == names
    assert [c["agent_name"] for c in outcome.calls_view] == names


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_agent_match_selects_only_that_agents_calls(case, run_case):
    outcome = run_case(case)
    owners = Counter(expected_names(outcome))
    assert [t["agent_name"] for t in outcome.matched] == [case.match] * owners[case.match]
    for t in outcome.matched:
        assert (t["prompt_token_ids"], t["response_token_ids"]) == outcome.recorded[t["response_id"]]
        assert t["reward"] == case.reward
