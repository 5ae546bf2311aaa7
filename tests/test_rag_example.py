"""The retrieval example (examples/rag): its generated world and questions, the BM25 index, the reward, and one epoch
of the real train flow with the Agents SDK agent on the session's tiny model."""

from __future__ import annotations

import json
import random
import sys

import pytest

from lightning_core.config import load_config
from lightning_core.store.catalog import Catalog
from lightning_core.store.outputs import load_triplets
from tests.conftest import REPO
from tests.helpers.tokens import gateway_tokens
from tests.test_examples import _overrides

RAG = REPO / "examples" / "rag"
sys.path.insert(0, str(RAG))

import make_data  # noqa: E402
import reward  # noqa: E402
from retriever import Retriever, build  # noqa: E402


@pytest.fixture(scope="module")
def rag_vllm(tmp_path_factory, tiny_model_dir, collector_config):
    """vLLM serving the tiny model with the example's own serving settings (its chat template, the tool-call parser,
    constrained JSON without free whitespace): the oracle's pinned calls fit a reply only without it, since a
    random model under a grammar that allows whitespace writes whitespace until its token budget ends."""
    from lightning_core.serving.vllm import start_vllm
    from tests.conftest import make_config

    config = make_config(tmp_path_factory.mktemp("rag-serving"), f"model.path={tiny_model_dir}",
                         "model.served_name=tiny", "serving.port=0", "serving.dtype=float32",
                         "serving.max_model_len=2048", "serving.max_lora_rank=16", "serving.redeploy=lora",
                         f"collector.endpoint={collector_config.collector.url}")
    config.serving.extra_args = list(load_config(RAG / "config.yaml").serving.extra_args)
    service = start_vllm(config)
    yield service
    service.stop()


@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
    """A 3,000-document world, its index, and 10 questions over it."""
    folder = tmp_path_factory.mktemp("rag-index")
    build(folder, docs=3000, seed=11)
    world = make_data.make_world(11, 3000)
    used: set[str] = set()
    questions = make_data.make_questions(world, random.Random(12), 10, used)
    questions += make_data.make_questions(world, random.Random(13), 6, used, make_data.ONE_HOP)
    return folder, world, questions


def test_every_question_follows_from_the_documents_of_its_chain(small_world):
    _, world, questions = small_world
    docs = {title: text for _, title, text in world.documents()}
    assert len(docs) == 3000  # every entity has one document, and no two share a name
    for q in questions:
        assert q["chain"][0] in q["question"]
        for here, there in zip(q["chain"], [*q["chain"][1:], q["answer"]]):
            assert there in docs[here]  # each hop's next name is in the current document
        assert q["hops"] == len(q["chain"])


def test_the_data_is_seeded_and_the_splits_do_not_share_an_entity():
    a, b = make_data.make_world(3, 500), make_data.make_world(3, 500)
    assert list(a.documents()) == list(b.documents())
    assert list(a.documents()) != list(make_data.make_world(4, 500).documents())
    rows = {name: [json.loads(line) for line in (RAG / name).read_text().splitlines()]
            for name in ("train.jsonl", "test.jsonl", "test_reworded.jsonl", "test_1hop.jsonl")}
    assert (len(rows["train.jsonl"]), len(rows["test.jsonl"]), len(rows["test_1hop.jsonl"])) == (1000, 100, 100)
    starts = {name: {q["chain"][0] for q in split} for name, split in rows.items()}
    assert not starts["train.jsonl"] & (starts["test.jsonl"] | starts["test_1hop.jsonl"])
    assert {q["hops"] for q in rows["train.jsonl"]} == {1, 2, 3} and {q["hops"] for q in rows["test_1hop.jsonl"]} == {1}
    for plain, reworded in zip(rows["test.jsonl"], rows["test_reworded.jsonl"]):
        assert plain["answer"] == reworded["answer"] and plain["question"] != reworded["question"]
        assert plain["chain"][0] in reworded["question"]
    assert {q["hops"] for q in rows["test.jsonl"]} == {2, 3}


def test_the_index_finds_a_document_by_its_name_from_the_mapped_index_and_nothing_for_unknown_words(small_world,
                                                                                                     monkeypatch):
    """What makes a search take milliseconds, asserted rather than timed: the index is memory-mapped (not read),
    and a search tokenizes its query alone and asks the index built once (not the corpus)."""
    import bm25s
    import numpy as np

    folder, world, questions = small_world
    retriever = Retriever(folder)
    assert {name: type(retriever.index.scores[name]) for name in ("data", "indices", "indptr")} == dict.fromkeys(
        ("data", "indices", "indptr"), np.memmap)
    tokenized, tokenize = [], bm25s.tokenize
    monkeypatch.setattr(bm25s, "tokenize", lambda texts, **kw: tokenized.append(len(texts)) or tokenize(texts, **kw))
    person = world.people[17]
    hits = retriever.search(person["name"], 3)
    assert hits[0].title == person["name"]
    assert retriever.search(questions[0]["question"], 3)[0].title == questions[0]["chain"][0]
    assert retriever.search("zzqx wrrbl", 3) == []
    assert tokenized == [1, 1, 1], f"texts tokenized per search: {tokenized}"  # the queries, nothing else


def test_the_worked_examples_follow_the_protocol_they_teach():
    """Each worked example searches with its question, then with a name its last result gave, and answers with a name
    from the last result: the base model copies what they show (README), so a slip here is learned."""
    import rag_agent

    items = rag_agent.example_items()
    assert [i["content"] for i in items if i.get("role") == "user"] == [q for q, _ in rag_agent.EXAMPLES]
    for question, steps in rag_agent.EXAMPLES:
        (first, arguments, _), *rest = steps
        assert (first, arguments) == ("search", {"query": question})
        for (_, _, before), (tool, arguments, _) in zip(steps, rest):
            name = arguments["query" if tool == "search" else "answer"]
            assert name in before and name not in question
        assert steps[-1][0] == "answer" and [tool for tool, _, _ in steps].count("answer") == 1
    outputs = [i["output"] for i in items if i.get("type") == "function_call_output"]
    assert outputs[0] == "Results for 'Who founded Kel Labs?':\n[1] " + rag_agent.EXAMPLES[0][1][0][2]


def test_a_measurement_reads_a_dataset_set_on_its_command_line_beside_the_config(tmp_path):
    """``measure.py --set rollouts.dataset=train.jsonl`` (README, the 2- and 3-hop task) trains on the example's
    file, not on one looked for in the fresh measurement folder."""
    sys.path.insert(0, str(REPO / "examples"))
    from measure import project_overrides

    overrides = project_overrides(RAG / "config.yaml", tmp_path / "work", "rag-measure-s0",
                                  ["rollouts.dataset=train.jsonl", "rollouts.group_size=4", "model.path=index"])
    cfg = load_config(RAG / "config.yaml", overrides=overrides)
    assert cfg.project_dir == tmp_path / "work" and cfg.rollouts.group_size == 4
    assert cfg.rollouts.dataset == RAG / "train.jsonl"
    assert cfg.model.path == str(RAG / "index")  # a folder beside the config (a merged checkpoint, say)
    assert cfg.rollouts.eval_dataset == load_config(RAG / "config.yaml").rollouts.eval_dataset  # the config's own


def test_a_missing_index_names_the_command_that_builds_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="build_index.py"):
        Retriever(tmp_path / "nowhere")


def test_the_reward_is_format_plus_token_f1_and_format_asks_for_a_name_from_the_retrieved_documents():
    docs = ["Ola Drent is a pilot born in Sorbdal in 1950. She works for Bex Mills."]
    assert reward.reward("Sorbdal", "Sorbdal", docs) == pytest.approx(1.0)
    assert reward.reward("Sorbdal", "Sorbdal", []) == pytest.approx(0.8)  # right, but found nowhere: no format score
    assert reward.reward("Ola Drent", "Ola Brenn", docs) == pytest.approx(0.2 + 0.8 * 0.5)
    assert reward.reward("Bex Mills", "Sorbdal", docs) == pytest.approx(0.2)  # a name from the results, wrong
    assert reward.reward("Tamvik", "Sorbdal", docs) == 0.0  # a name from nowhere: the shortcut the first run learned
    long = "pilot born in Sorbdal in 1950"
    assert reward.reward(long, "Sorbdal", docs) == pytest.approx(0.8 * 2 * (1 / 6) / (1 / 6 + 1))  # 6 words
    assert reward.reward(None, "Sorbdal", docs) == 0.0 and reward.reward("", "Sorbdal", docs) == 0.0
    assert reward.exact_match("The Sorbdal.", "sorbdal") and not reward.exact_match("Sorbdal city", "Sorbdal")


def test_the_shaping_reward_counts_the_gold_chain_documents_found_and_only_in_training():
    """resources.chain_doc_bonus (multihop_grpo.yaml): each document of the question's chain that a search found adds
    the bonus to a training rollout's reward, recorded as rag.shaping; evaluations score format + F1 alone."""
    from types import SimpleNamespace

    from opentelemetry.sdk.trace import TracerProvider
    from rag_agent import Trace
    from rag_entry import chain_doc_bonus, score

    task = {"question": "Where was the boss of Ola Drent born?", "answer": "Sorbdal", "chain": ["Ola Drent", "Bex Mills"]}
    # two searches found the chain's first document and a namesake; the answer is a name from nowhere
    trace = Trace(queries=["Ola Drent", "Bex Mill"], found=[["Ola Drent"], ["Bex Mill"]],
                  texts=["Ola Drent works for Bex Mills.", "Bex Mill is a river."], answer="Tamvik")
    with TracerProvider().get_tracer("t").start_as_current_span("rollout") as span:
        assert score(task, trace) == 0.0
        assert span.attributes["rag.shaping"] == 0.0 and span.attributes["rag.chain_found"] == 1
        assert score(task, trace, chain_doc_bonus=0.1) == pytest.approx(0.1)  # one of the two chain documents
        assert span.attributes["rag.shaping"] == pytest.approx(0.1)
    trace.found[1], trace.answer = ["Bex Mills"], "Sorbdal"
    trace.texts[1] = "Bex Mills' boss was born in Sorbdal."
    assert score(task, trace, chain_doc_bonus=0.1) == pytest.approx(1.2)  # right and grounded, both documents found
    assert chain_doc_bonus(SimpleNamespace(mode="train", resources={"chain_doc_bonus": 0.1})) == 0.1
    assert chain_doc_bonus(SimpleNamespace(mode="eval", resources={"chain_doc_bonus": 0.1})) == 0.0
    assert chain_doc_bonus(SimpleNamespace(mode="train", resources={})) == 0.0


def _one_epoch(config: str, run: str, questions: list[dict], tmp_path, index, vllm, collector, collector_config,
               tiny_model_dir, **extra: str):
    """One epoch of the example's ``config`` on ``questions``, on the module's servers; its summary row and config."""
    from flows.train import train_epoch

    dataset = tmp_path / f"{run}.jsonl"
    dataset.write_text("".join(json.dumps(q) + "\n" for q in questions))
    overrides = _overrides(tmp_path, run=run, agent_path=RAG, vllm_server=vllm, collector=collector,
                           collector_config=collector_config, tiny_model_dir=tiny_model_dir, dataset=str(dataset),
                           **{"rollouts.resources.index": str(index), "evaluation.every_epochs": "null", "epochs": "1",
                              **extra})
    row = train_epoch(config_path=str(RAG / config), overrides=overrides)
    return row, load_config(RAG / config, overrides=overrides)


@pytest.mark.integration
def test_one_epoch_of_the_agents_sdk_retrieval_agent_trains_the_researcher(
    prefect_harness, tmp_path, small_world, rag_vllm, collector, collector_config, tiny_model_dir
):
    assert "lightning_core" not in (RAG / "rag_agent.py").read_text()  # the agent is plain Agents SDK code
    folder, _, questions = small_world
    run = "ex-rag"
    row, cfg = _one_epoch("config.yaml", run, questions[:2], tmp_path, folder, rag_vllm, collector, collector_config,
                          tiny_model_dir, **{"rollouts.resources.max_tokens": "48", "rollouts.informative_groups": "null"})
    assert (row["status"], row["succeeded"]) == ("completed", 6)

    gateway = {rid: response for rid, (_, response) in gateway_tokens(cfg, run).items()}  # the run has one epoch
    with Catalog.from_config(cfg).read() as con:
        outcomes = con.execute(
            "SELECT attributes->>'rag.searches', attributes->>'rag.f1' FROM spans WHERE run_id = ? AND epoch = 0 "
            "AND attributes->>'rag.searches' IS NOT NULL", [run]).fetchall()
        agents = con.execute("SELECT DISTINCT agent_name FROM llm_calls WHERE run_id = ? AND epoch = 0", [run]).fetchall()
        # each search's information gain, on its tool span, charged to the researcher's call that wrote it
        rewarded = con.execute("SELECT count(*) FROM spans WHERE run_id = ? AND epoch = 0 "
                               "AND attributes->>'arclight.tool.reward' IS NOT NULL", [run]).fetchall()[0][0]
        charged = con.execute("SELECT count(*), count(c.call_key) FROM rewards r LEFT JOIN llm_calls c "
                              "ON c.rollout_id = r.rollout_id AND c.call_key = r.caused_by_call AND c.agent_name = 'researcher' "
                              "WHERE r.run_id = ? AND r.epoch = 0 AND r.kind = 'tool_reward'", [run]).fetchall()[0]
    triplets = load_triplets(cfg, run_id=run, epoch=0, policy="researcher").to_pylist()
    assert len(outcomes) == 6  # what each rollout searched and scored, on its span
    assert rewarded == sum(int(searches) for searches, _ in outcomes) and charged == (rewarded, rewarded)
    assert agents == [("researcher",)] and len(triplets) == len(gateway) >= 6
    for t in triplets:
        assert t["agent_name"] == "researcher" and t["response_token_ids"] == gateway[t["response_id"]]
        assert -1.0 <= t["reward"] <= 1.0


def test_the_oracle_follows_each_chain_searching_with_the_question_first_where_it_finds_the_first_document(small_world):
    import rag_teach

    folder, _, questions = small_world
    retriever = Retriever(folder)
    for q in questions:
        calls = rag_teach.plan(q, retriever, k=1)
        first = retriever.search(q["question"], 1)[0].title
        assert calls[0] == ("search", {"query": q["question"] if first == q["chain"][0] else q["chain"][0]})
        assert calls[1:-1] == [("search", {"query": name}) for name in q["chain"][1:]]
        assert calls[-1] == ("answer", {"answer": q["answer"]}) and len(calls) == q["hops"] + 1
        for (_, arguments), name in zip(calls, q["chain"]):  # every search finds the chain's next document
            assert retriever.search(arguments["query"], 1)[0].title == name
    assert any(c[0][1]["query"] == q["question"] for q in questions for c in [rag_teach.plan(q, retriever, k=1)])


@pytest.mark.integration
def test_an_sft_epoch_of_the_multihop_warm_start_trains_on_the_oracles_traces_as_the_gateway_recorded_them(
    prefect_harness, tmp_path, small_world, rag_vllm, collector, collector_config, tiny_model_dir
):
    """multihop_sft.yaml: sample 0 of each group is the scripted oracle, written by the served model under a
    constraint; its calls are ordinary traces, and SFT trains on the rollouts that succeeded."""
    folder, _, questions = small_world
    run = "ex-rag-sft"
    row, cfg = _one_epoch("multihop_sft.yaml", run, [q for q in questions if q["hops"] > 1][:2], tmp_path, folder,
                          rag_vllm, collector, collector_config, tiny_model_dir,
                          **{"rollouts.resources.max_tokens": "160", "rollouts.group_size": "2",
                             "rollouts.timeout_s": "120"})
    assert (row["status"], row["succeeded"]) == ("completed", 4)

    gateway = {rid: response for rid, (_, response) in gateway_tokens(cfg, run).items()}
    with Catalog.from_config(cfg).read() as con:
        sources = con.execute(
            "SELECT attributes->>'rag.source', (attributes->>'arclight.rollout.sample_index')::INT, count(*) FROM spans "
            "WHERE run_id = ? AND attributes->>'rag.searches' IS NOT NULL GROUP BY ALL ORDER BY ALL", [run]).fetchall()
        oracle = con.execute(
            "SELECT rollout_id, attributes->>'rag.chain_found', attributes->>'rag.chain_length', "
            "attributes->>'rag.exact_match' FROM spans WHERE run_id = ? AND attributes->>'rag.source' = 'oracle'",
            [run]).fetchall()
    assert sources == [("oracle", 0, 2), ("sample", 1, 2)]  # sample 0 of each group is the oracle, the rest the model
    # the oracle found every document of its chain and answered right, whatever the (tiny, random) model would write
    assert len(oracle) == 2 and all(found == length and exact == "true" for _, found, length, exact in oracle)
    triplets = load_triplets(cfg, run_id=run, epoch=0, policy="researcher").to_pylist()
    taught = [t for t in triplets if t["rollout_id"] in {r for r, *_ in oracle}]
    hops = sum(len(q["chain"]) for q in [q for q in questions if q["hops"] > 1][:2])
    assert len(taught) == hops + 2  # a search per hop and the answer, for each of the two questions
    for t in taught:  # what SFT trains on is what the model wrote, token for token as the gateway recorded it
        assert t["response_token_ids"] == gateway[t["response_id"]] and t["reward"] == pytest.approx(1.0)
    # each oracle search found the next document of its chain: information gain +1 on its tool span, charged to the
    # researcher's call that wrote it (sql/rewards.sql, kind tool_reward)
    with Catalog.from_config(cfg).read() as con:
        gains = con.execute(
            "SELECT r.rollout_id, r.value, c.agent_name FROM rewards r LEFT JOIN llm_calls c "
            "ON c.rollout_id = r.rollout_id AND c.call_key = r.caused_by_call "
            "WHERE r.run_id = ? AND r.kind = 'tool_reward'", [run]).fetchall()
    assert sorted((v, a) for r, v, a in gains if r in {r for r, *_ in oracle}) == [(1.0, "researcher")] * hops
    assert row["new_version"] == "researcher-v1"


def test_after_max_searches_the_agent_is_offered_only_the_answer_tool(small_world, monkeypatch):
    """resources.max_searches (the multi-hop configs: 3 of 4 turns): once the agent has searched that many times,
    answer is the only tool of its next request, so under tool_choice="required" the last turn answers."""
    import asyncio

    from agents import RunContextWrapper
    from rag_agent import Trace, build_agent
    from rag_entry import max_searches

    monkeypatch.setenv("OPENAI_API_KEY", "x")
    folder, _, _ = small_world
    trace = Trace()
    agent = build_agent(Retriever(folder), trace, model="m", temperature=0.0, max_tokens=8, k=1,
                        max_searches=max_searches({"max_searches": 2}))
    offered = lambda: sorted(t.name for t in asyncio.run(agent.get_all_tools(RunContextWrapper(context=None))))  # noqa: E731
    assert offered() == ["answer", "search"]
    trace.queries += ["first", "second"]
    assert offered() == ["answer"]
    assert max_searches({}) is None  # no limit unless the config sets one (config.yaml's one-hop default)
    unlimited = build_agent(Retriever(folder), Trace(queries=["q"] * 9), model="m", temperature=0.0, max_tokens=8, k=1)
    assert sorted(t.name for t in asyncio.run(unlimited.get_all_tools(RunContextWrapper(context=None)))) == ["answer", "search"]


def test_each_search_reports_its_information_gain_on_its_own_tool_span(monkeypatch):
    """rag_entry.search_rewarder: +1 per gold chain document not seen before in the rollout, -0.5 per document seen
    again, as arclight.tool.reward on the search's tool span, which the pipeline charges to the call that wrote it.
    The model is a script of four tool calls (what it says does not matter here); the Agents SDK, its OpenInference
    instrumentation and the tool are the real ones."""
    import asyncio

    from agents import ModelResponse, Runner, Usage, set_trace_processors
    from agents.models.interface import Model
    from openai.types.responses import ResponseFunctionToolCall
    from openinference.instrumentation.openai_agents import OpenAIAgentsInstrumentor
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from rag_agent import Trace, build_agent
    from rag_entry import information_gain, search_rewarder
    from retriever import Hit

    seen: set[str] = set()
    assert information_gain(["Bex Mills"], chain=["Bex Mills", "Ola Drent"], seen=seen) == 1.0
    assert information_gain(["Bex Mills", "Tamvik"], chain=["Bex Mills", "Ola Drent"], seen=seen) == -0.5  # -0.5 + 0
    assert information_gain(["Ola Drent"], chain=["Bex Mills", "Ola Drent"], seen=seen) == 1.0
    assert information_gain([], chain=["Bex Mills"], seen=seen) == 0.0 and seen == {"Bex Mills", "Tamvik", "Ola Drent"}

    class Script(Model):
        def __init__(self, calls):
            self.calls = list(calls)

        async def get_response(self, *args, **kwargs):
            name, arguments = self.calls.pop(0)
            call = ResponseFunctionToolCall(type="function_call", call_id=f"c{len(self.calls)}", name=name,
                                            arguments=json.dumps(arguments))
            return ModelResponse(output=[call], usage=Usage(), response_id=None)

        def stream_response(self, *args, **kwargs):
            raise NotImplementedError

    class ByTitle:  # a search returns the document titled as its query
        def search(self, query, k):
            return [Hit(query, query, f"{query} is in the encyclopedia.", 1.0)]

    monkeypatch.setenv("OPENAI_API_KEY", "x")  # build_agent makes a client; the script stands in for it
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    set_trace_processors([])  # nothing to OpenAI's servers
    OpenAIAgentsInstrumentor().instrument(tracer_provider=provider)
    try:
        agent = build_agent(ByTitle(), Trace(), model="m", temperature=0.0, max_tokens=8, k=1,
                            on_search=search_rewarder({"chain": ["Bex Mills", "Ola Drent"]}))
        agent.model = Script([("search", {"query": "Bex Mills"}), ("search", {"query": "Bex Mills"}),
                              ("search", {"query": "Tamvik"}), ("search", {"query": "Ola Drent"}),
                              ("answer", {"answer": "Sorbdal"})])
        asyncio.run(Runner.run(agent, "Where was the founder of Bex Mills born?", max_turns=6))
    finally:
        OpenAIAgentsInstrumentor().uninstrument()
    tools = [(s.name, s.attributes.get("arclight.tool.reward")) for s in exporter.get_finished_spans()
             if s.attributes.get("openinference.span.kind") == "TOOL"]
    assert tools == [("search", 1.0), ("search", -0.5), ("search", 0.0), ("search", 1.0), ("answer", None)]
