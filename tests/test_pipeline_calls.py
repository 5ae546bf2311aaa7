"""Stage 3 (sql/llm_calls.sql): merging duplicate spans of a call, messages, judges, missing ids."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from lightning_core.common.model import tokenizer_cache_dir
from lightning_core.pipeline.steps import PipelineError
from lightning_core.pipeline.triplets import materialize_triplets
from lightning_core.store.outputs import load_triplets
from tests.conftest import make_config
from tests.spans_factory import Rollout, rows, shared_stages, write


def test_nested_duplicate_spans_of_one_call_merge_and_take_token_ids_from_the_gateway(tmp_path):
    cfg = make_config(tmp_path)
    r = Rollout("ro1")
    agent = r.agent("planner", 0, 100, parent=r.span("rollout", 0, 100))
    chain = r.span("ChatOpenAI", 10, 50, parent=agent, attrs={"llm.request.type": "chat"})
    client = r.span("openai.chat", 11, 49, parent=chain, attrs={
        "gen_ai.operation.name": "chat", "gen_ai.response.id": "chatcmpl-1",
        "gen_ai.input.messages": json.dumps([{"role": "user", "parts": [{"type": "text", "content": "2+2?"}]}]),
        "gen_ai.output.messages": json.dumps([{"role": "assistant", "parts": [{"type": "text", "content": "4"}]}])})
    gateway = r.call(12, 48, parent=client, response_id="chatcmpl-1", prompt=(7, 8, 9), response=(10,), logprobs=(-0.5,), text="4")
    write(cfg.lake.path, [r])
    [call] = rows(shared_stages(cfg), "SELECT * FROM llm_calls")
    assert call["span_count"] == 3 and call["span_id"] == gateway
    assert call["prompt_token_ids"] == [7, 8, 9] and call["response_token_ids"] == [10]
    assert call["response_logprobs"] == [-0.5] and call["response_text"] == "4"
    assert call["agent_name"] == "planner" and call["flags"] == []
    assert call["outer_span_id"] == chain


def test_gateway_span_in_its_own_trace_joins_its_call_by_response_id_or_by_time(tmp_path):
    cfg = make_config(tmp_path)
    r = Rollout("ro1")
    agent = r.agent("writer", 0, 100, parent=r.span("rollout", 0, 100))
    # OpenInference client span: the response id only inside output.value
    r.span("ChatCompletion", 10, 30, parent=agent, attrs={
        "openinference.span.kind": "LLM", "output.value": json.dumps({"id": "chatcmpl-9", "choices": []})})
    r.call(11, 29, response_id="chatcmpl-9", trace_id="a" * 32, prompt=(1,), response=(2,))
    # Agents SDK generation span: no response id at all; the gateway span nests in time
    r.span("generation", 40, 60, parent=agent, attrs={"gen_ai.operation.name": "chat"})
    r.call(41, 59, trace_id="b" * 32, prompt=(3,), response=(4,))
    write(cfg.lake.path, [r])
    calls = rows(shared_stages(cfg), "SELECT * FROM llm_calls ORDER BY start_ns")
    assert [(c["prompt_token_ids"], c["span_count"], c["agent_name"]) for c in calls] == [([1], 2, "writer"), ([3], 2, "writer")]


def test_judge_call_inside_a_reward_function_is_not_training_data(tmp_path):
    cfg = make_config(tmp_path)
    r = Rollout("ro1", task_id="t")
    agent = r.agent("solver", 0, 50, parent=r.span("rollout", 0, 100))
    r.call(10, 20, parent=agent)
    judge_fn = r.span("reward judge", 60, 90, attrs={"arclight.span.kind": "reward"}, parent=agent)
    r.call(61, 80, parent=judge_fn, text="score: 1")
    r.reward(1.0, 85, parent=judge_fn)
    write(cfg.lake.path, [r])
    calls = rows(shared_stages(cfg), "SELECT in_reward, flags FROM llm_calls ORDER BY start_ns")
    assert calls == [{"in_reward": False, "flags": []}, {"in_reward": True, "flags": ["judge"]}]
    report = materialize_triplets(cfg, run_id="r1", epoch=0)
    assert report.judge_calls == 1 and report.policies[0].triplets == 1
    assert load_triplets(cfg, run_id="r1", epoch=0, policy="default")["reward"].to_pylist() == [1.0]


def _uninstrumented_rollout() -> Rollout:
    r = Rollout("ro1", task_id="t")
    agent = r.agent("solver", 0, 50, parent=r.span("rollout", 0, 100))
    r.span("openai.chat", 10, 20, parent=agent, attrs={  # OpenLLMetry < 0.55, no gateway
        "llm.request.type": "chat", "gen_ai.prompt.0.role": "system", "gen_ai.prompt.0.content": "Be brief.",
        "gen_ai.prompt.1.role": "user", "gen_ai.prompt.1.content": "Say hi.", "gen_ai.completion.0.content": "hi"})
    r.span("ChatCompletion", 30, 40, parent=agent, attrs={  # OpenInference, no gateway
        "openinference.span.kind": "LLM", "llm.input_messages.0.message.role": "user",
        "llm.input_messages.0.message.content": "And bye?", "llm.output_messages.0.message.content": "bye"})
    r.call(42, 45, parent=agent)
    r.reward(1.0, 48, parent=agent)
    return r


def test_calls_without_token_ids_are_flagged_with_their_flattened_messages(tmp_path):
    cfg = make_config(tmp_path)
    write(cfg.lake.path, [_uninstrumented_rollout()])
    calls = rows(shared_stages(cfg), "SELECT * FROM llm_calls ORDER BY start_ns")
    assert json.loads(calls[0]["prompt_messages"]) == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi."}]
    assert json.loads(calls[1]["prompt_messages"]) == [{"role": "user", "content": "And bye?"}]
    assert [c["response_text"] for c in calls] == ["hi", "bye", "ok"]
    assert [c["flags"] for c in calls] == [["missing_token_ids", "missing_logprobs"]] * 2 + [[]]
    report = materialize_triplets(cfg, run_id="r1", epoch=0)
    assert report.policies[0].triplets == 3 and report.policies[0].missing_token_ids == 2


def test_token_ids_that_do_not_fit_32_bits_stay_in_the_attributes_and_the_call_is_flagged(tmp_path):
    # triplets store token ids as 32-bit integers: ingest keeps an id list it cannot store as such
    # in the attribute JSON (nothing lost), and the pipeline flags the call instead of failing the epoch
    cfg = make_config(tmp_path)
    r = Rollout("ro1", task_id="t")
    agent = r.agent("solver", 0, 100, parent=r.span("rollout", 0, 100))
    r.call(10, 20, parent=agent, prompt=(1, 2**31), response=(3,))
    r.call(30, 40, parent=agent, prompt=(5, 2**31 - 1), response=(-1,))
    r.call(50, 60, parent=agent, prompt=(7, 8), response=(9,))
    write(cfg.lake.path, [r])
    con = shared_stages(cfg)
    stored = rows(con, "SELECT prompt_token_ids, response_token_ids, attributes FROM spans_raw WHERE span_kind = 'llm' ORDER BY start_ns")
    assert [(s["prompt_token_ids"], s["response_token_ids"]) for s in stored] == [(None, [3]), ([5, 2**31 - 1], None), ([7, 8], [9])]
    assert json.loads(stored[0]["attributes"])["arclight.llm.prompt_token_ids"] == [1, 2**31]
    assert json.loads(stored[1]["attributes"])["arclight.llm.response_token_ids"] == [-1]
    report = materialize_triplets(cfg, run_id="r1", epoch=0)
    triplets = load_triplets(cfg, run_id="r1", epoch=0, policy="default")
    assert triplets.schema.field("prompt_token_ids").type == pa.list_(pa.int32())
    assert [("missing_token_ids" in f, p) for f, p in zip(triplets["flags"].to_pylist(), triplets["prompt_token_ids"].to_pylist())] == [
        (True, None), (True, [5, 2**31 - 1]), (False, [7, 8])]
    assert report.policies[0].missing_token_ids == 2


def test_a_lake_file_with_token_ids_past_32_bits_fails_with_the_fix_not_a_bare_cast_error(tmp_path):
    cfg = make_config(tmp_path)
    r = Rollout("ro1", task_id="t")
    r.call(10, 20, parent=r.agent("solver", 0, 100), prompt=(1, 2), response=(3,))
    r.rows[-1]["prompt_token_ids"] = [1, 2**40]  # written around ingest, which would have refused it
    write(cfg.lake.path, [r])
    with pytest.raises(PipelineError, match=r"stage 'llm_spans' .*must be integers in \[0, 2\^31\).*re-ingest"):
        materialize_triplets(cfg, run_id="r1", epoch=0)


def test_missing_token_ids_can_be_dropped(tmp_path):
    cfg = make_config(tmp_path, "pipeline.missing_token_ids=drop")
    write(cfg.lake.path, [_uninstrumented_rollout()])
    report = materialize_triplets(cfg, run_id="r1", epoch=0)
    assert report.policies[0].triplets == 1 and report.policies[0].dropped == 2
    assert load_triplets(cfg, run_id="r1", epoch=0, policy="default")["turn_index"].to_pylist() == [0]


def test_missing_token_ids_can_be_retokenized_and_say_so(tmp_path):
    from lightning_core.common.model import load_tokenizer

    tokenizer = load_tokenizer()
    cfg = make_config(tmp_path, "pipeline.missing_token_ids=retokenize", f"pipeline.tokenizer_path={tokenizer_cache_dir()}")
    write(cfg.lake.path, [_uninstrumented_rollout()])
    report = materialize_triplets(cfg, run_id="r1", epoch=0)
    assert report.policies[0].retokenized == 2
    first = load_triplets(cfg, run_id="r1", epoch=0, policy="default").to_pylist()[0]
    assert "retokenized" in first["flags"] and "missing_token_ids" not in first["flags"]
    assert first["response_token_ids"] == tokenizer.encode("hi", add_special_tokens=False)
    assert tokenizer.decode(first["prompt_token_ids"]).count("Say hi.") == 1
    assert first["response_logprobs"] is None


def test_triplets_take_each_wide_field_from_the_span_chosen_for_it(tmp_path):
    # the gateway span has token ids but no messages or text: those come from the client span
    cfg = make_config(tmp_path)
    r = Rollout("ro1")
    agent = r.agent("planner", 0, 100, parent=r.span("rollout", 0, 100))
    client = r.span("openai.chat", 10, 40, parent=agent, attrs={
        "gen_ai.operation.name": "chat", "gen_ai.response.id": "chatcmpl-1",
        "gen_ai.input.messages": json.dumps([{"role": "user", "parts": [{"type": "text", "content": "2+2?"}]}]),
        "gen_ai.output.messages": json.dumps([{"role": "assistant", "parts": [{"type": "text", "content": "4"}]}])})
    r.span("chat base", 11, 39, parent=client, attrs={
        "arclight.span.kind": "llm", "gen_ai.operation.name": "chat", "gen_ai.response.id": "chatcmpl-1",
        "arclight.llm.prompt_token_ids": [7, 8], "arclight.llm.response_token_ids": [9],
        "arclight.llm.response_logprobs": [-0.25]})
    r.call(50, 60, parent=agent, prompt=(1, 2), response=(3,), logprobs=(-0.5,), text="second")
    r.reward(1.0, 90)
    write(cfg.lake.path, [r])
    calls = rows(shared_stages(cfg), "SELECT prompt_token_ids, response_token_ids, response_logprobs, prompt_messages, "
                                     "response_text FROM llm_calls ORDER BY start_ns")
    materialize_triplets(cfg, run_id="r1", epoch=0)
    triplets = load_triplets(cfg, run_id="r1", epoch=0, policy="default").select(list(calls[0])).to_pylist()
    assert triplets == calls
    assert triplets[0]["prompt_token_ids"] == [7, 8] and triplets[0]["response_text"] == "4"
    assert json.loads(triplets[0]["prompt_messages"])[0]["parts"][0]["content"] == "2+2?"
    assert triplets[1]["response_text"] == "second" and triplets[1]["response_logprobs"] == [-0.5]


def test_a_compaction_during_a_pipeline_run_costs_no_call_its_token_ids(tmp_path, monkeypatch):
    # llm_spans reads the payload back from the files span_nodes listed: a compaction in between
    # replaces those files in the table, but the run reads its snapshot, whose files stay for the
    # retention window (before the Delta store, this silently stripped every call of its token ids)
    from lightning_core.pipeline import triplets as pipeline
    from lightning_core.store.spans import Lake

    cfg = make_config(tmp_path)
    for i in range(4):  # one file per rollout, as the collector's group commits write them
        r = Rollout(f"ro{i}", task_id="t1")
        agent = r.agent("planner", 0, 100, parent=r.span("rollout", 0, 100))
        r.call(10, 20, parent=agent, prompt=(i, i + 1), response=(7,), logprobs=(-0.5,))
        r.reward(float(i), 90, parent=agent)
        write(cfg.lake.path, [r])
    lake = Lake(cfg.lake.path)
    merges = []
    run_stage = pipeline.run_stage

    def compact_between_stages(con, stage, **kw):
        if stage == "llm_spans" and kw["params"]["run_id"] == "r1":
            merges.append(lake.compact(min_files=2, idle_s=0))
        return run_stage(con, stage, **kw)

    monkeypatch.setattr(pipeline, "run_stage", compact_between_stages)
    report = materialize_triplets(cfg, run_id="r1", epoch=0)
    assert merges == [1]  # compaction went ahead while the run read
    triplets = load_triplets(cfg, run_id="r1", epoch=0, policy="default").to_pylist()
    assert report.policies[0].missing_token_ids == 0
    assert sorted(t["prompt_token_ids"] for t in triplets) == [[0, 1], [1, 2], [2, 3], [3, 4]]
    assert lake.compact(min_files=2, idle_s=0) == 0  # nothing left to merge
    report = materialize_triplets(cfg, run_id="r1", epoch=0)  # a run after it reads the merged file
    assert report.policies[0].missing_token_ids == 0 and report.span_versions["training"] == 5  # create, 4 writes, optimize


def _langchain_output(response_id: str, text: str) -> str:
    """OpenInference's output.value of a LangChain chat model span: an LLMResult, the id deep inside."""
    message = {"lc": 1, "type": "constructor", "id": ["langchain", "schema", "messages", "AIMessage"],
               "kwargs": {"content": text, "response_metadata": {"model_name": "tiny", "id": response_id}, "type": "ai"}}
    return json.dumps({"generations": [[{"text": text, "type": "ChatGeneration", "message": message}]],
                       "llm_output": {"model_name": "tiny", "id": response_id}, "run": None, "type": "LLMResult"})


def _langgraph_rollout(*, repair_leaves_the_client_beside: bool = False) -> tuple[Rollout, dict]:
    """A LangGraph node with a ChatOpenAI span (OpenInference) and the openai client span of the same
    call hung on the root (the client instrumentation lost LangChain's context), and the gateway span."""
    r = Rollout("ro1", task_id="t")
    root = r.span("LangGraph", 0, 100)
    node = r.span("planner", 10, 90, parent=root, attrs={"metadata": '{"langgraph_node": "planner"}'})
    chat = r.span("ChatOpenAI", 20, 60, parent=node, attrs={
        "openinference.span.kind": "LLM", "output.value": _langchain_output("chatcmpl-7", "four")})
    client = r.span("openai.chat", 22, 58, parent=node if repair_leaves_the_client_beside else root, attrs={
        "gen_ai.operation.name": "chat", "gen_ai.response.id": "chatcmpl-7"})
    gateway = r.call(23, 57, response_id="chatcmpl-7", trace_id="c" * 32, prompt=(5, 6), response=(7,), logprobs=(-0.5,))
    r.span("score", 95, 95, parent=root, attrs={"arclight.reward.value": 1.0})
    return r, {"chat": chat, "client": client, "gateway": gateway, "node": node}


def test_langchain_response_id_inside_output_value_joins_the_framework_span_to_its_call(tmp_path):
    # fails before: the ChatOpenAI span's id was not read, so it was a second call without token ids
    cfg = make_config(tmp_path, "pipeline.repair=false")
    r, ids = _langgraph_rollout()
    write(cfg.lake.path, [r])
    calls = rows(shared_stages(cfg), "SELECT response_id, span_count, agent_name, prompt_token_ids, flags FROM llm_calls")
    assert calls == [{"response_id": "chatcmpl-7", "span_count": 3, "agent_name": "planner",
                      "prompt_token_ids": [5, 6], "flags": []}]


def test_a_client_span_hung_on_the_root_moves_into_the_framework_llm_span_of_its_call(tmp_path):
    # fails before: repair moved it into the node, beside ChatOpenAI, and the two were two calls
    cfg = make_config(tmp_path)
    r, ids = _langgraph_rollout()
    write(cfg.lake.path, [r])
    con = shared_stages(cfg)
    tree = {t["span_id"]: t for t in rows(con, "SELECT span_id, parent_span_id, repair_reason, agent_name FROM span_agents")}
    assert tree[ids["client"]]["parent_span_id"] == ids["chat"] and tree[ids["client"]]["repair_reason"] == "llm_skipped"
    assert tree[ids["gateway"]]["parent_span_id"] == ids["client"] and tree[ids["gateway"]]["agent_name"] == "planner"
    [call] = rows(con, "SELECT span_id, outer_span_id, span_count, agent_name, response_token_ids FROM llm_calls")
    assert call == {"span_id": ids["gateway"], "outer_span_id": ids["chat"], "span_count": 3, "agent_name": "planner",
                    "response_token_ids": [7]}


@pytest.mark.parametrize("repair", [True, False])
def test_llm_spans_that_one_encloses_in_time_are_one_call_without_a_response_id(tmp_path, repair):
    # the Agents SDK's generation span has no response id and is not the gateway span's parent
    cfg = make_config(tmp_path, f"pipeline.repair={str(repair).lower()}")
    r = Rollout("ro1", task_id="t")
    agent = r.span("triage", 0, 100, parent=r.span("Agent workflow", 0, 100), attrs={
        "openinference.span.kind": "AGENT", "agent.name": "triage"})
    r.span("generation", 10, 40, parent=agent, attrs={"openinference.span.kind": "LLM"})
    r.call(11, 39, trace_id="d" * 32, response_id="chatcmpl-a", prompt=(1,), response=(2,))
    r.span("generation", 50, 80, parent=agent, attrs={"openinference.span.kind": "LLM"})
    r.call(51, 79, trace_id="e" * 32, response_id="chatcmpl-b", prompt=(3,), response=(4,))
    write(cfg.lake.path, [r])
    calls = rows(shared_stages(cfg), "SELECT response_id, span_count, agent_name, prompt_token_ids FROM llm_calls ORDER BY start_ns")
    assert calls == [{"response_id": "chatcmpl-a", "span_count": 2, "agent_name": "triage", "prompt_token_ids": [1]},
                     {"response_id": "chatcmpl-b", "span_count": 2, "agent_name": "triage", "prompt_token_ids": [3]}]


def test_calls_with_different_response_ids_stay_apart_even_when_one_encloses_the_other(tmp_path):
    cfg = make_config(tmp_path)
    r = Rollout("ro1", task_id="t")
    agent = r.agent("solver", 0, 100, parent=r.span("rollout", 0, 100))
    r.call(10, 60, parent=agent, response_id="slow", prompt=(1,))  # two calls in flight at once
    r.call(20, 30, parent=agent, response_id="fast", prompt=(2,))
    r.span("generation", 70, 90, parent=agent, attrs={"openinference.span.kind": "LLM"})  # no id: its own call
    write(cfg.lake.path, [r])
    calls = rows(shared_stages(cfg), "SELECT response_id, span_count FROM llm_calls ORDER BY start_ns")
    assert calls == [{"response_id": "slow", "span_count": 1}, {"response_id": "fast", "span_count": 1},
                     {"response_id": None, "span_count": 1}]


def test_empty_token_arrays_count_as_missing(tmp_path):
    # fails before: a call with [] token ids was a triplet with 0 prompt and 0 response tokens, unflagged
    cfg = make_config(tmp_path)
    r = Rollout("ro1", task_id="t")
    agent = r.agent("solver", 0, 100, parent=r.span("rollout", 0, 100))
    r.call(10, 20, parent=agent, prompt=(), response=(), logprobs=())
    r.span("openai.chat.completion", 30, 40, parent=agent, attrs={
        "llm.request.type": "chat", "prompt_token_ids": [], "response_token_ids": []})
    write(cfg.lake.path, [r])
    report = materialize_triplets(cfg, run_id="r1", epoch=0)
    triplets = load_triplets(cfg, run_id="r1", epoch=0, policy="default").to_pylist()
    assert [(t["prompt_token_ids"], t["response_token_ids"], "missing_token_ids" in t["flags"]) for t in triplets] == [
        (None, None, True), (None, None, True)]
    assert report.policies[0].missing_token_ids == 2


def test_token_ids_a_sender_writes_as_attributes_are_used_instead_of_retokenizing(tmp_path):
    # fails before: Agent Lightning's / a Node.js exporter's prompt_token_ids were not read; the call
    # was not even recognised without another LLM marker, and with one it was retokenized
    cfg = make_config(tmp_path, "pipeline.missing_token_ids=retokenize", "pipeline.tokenizer_path=/nonexistent")
    r = Rollout("ro1", task_id="t")
    agent = r.agent("solver", 0, 100, parent=r.span("rollout", 0, 100))
    r.span("openai.chat.completion", 10, 20, parent=agent, attrs={
        "gen_ai.response.id": "chatcmpl-1", "prompt_token_ids": [11, 12, 13], "response_token_ids": [14, 15],
        "logprobs.content": json.dumps([{"token": "a", "logprob": -0.25}, {"token": "b", "logprob": -0.5}])})
    r.span("chat tiny", 30, 40, parent=agent, attrs={  # ids out of range or not integers: missing, not cast
        "gen_ai.operation.name": "chat", "prompt_token_ids": [1, 2**31], "response_token_ids": [1.5]})
    write(cfg.lake.path, [r])
    calls = rows(shared_stages(cfg), "SELECT prompt_token_ids, response_token_ids, response_logprobs, flags FROM llm_calls ORDER BY start_ns")
    assert calls[0] == {"prompt_token_ids": [11, 12, 13], "response_token_ids": [14, 15],
                        "response_logprobs": [-0.25, -0.5], "flags": []}
    assert calls[1]["prompt_token_ids"] is None and "missing_token_ids" in calls[1]["flags"]
    with pytest.raises(PipelineError, match=r"retokenize needs a tokenizer: expected tokenizer_config.json in /nonexistent"):
        materialize_triplets(cfg, run_id="r1", epoch=0)  # the second call needs one; the first did not


def test_llm_call_match_marks_spans_by_name_on_top_of_the_attributes(tmp_path):
    cfg = make_config(tmp_path, r"pipeline.llm_call_match=^my_llm\.")
    r = Rollout("ro1", task_id="t")
    agent = r.agent("solver", 0, 100, parent=r.span("rollout", 0, 100))
    r.span("my_llm.generate", 10, 20, parent=agent, attrs={"gen_ai.response.id": "x1"})
    r.span("not_my_llm.generate", 30, 40, parent=agent, attrs={"gen_ai.response.id": "x2"})
    r.call(50, 60, parent=agent)
    write(cfg.lake.path, [r])
    assert [c["response_id"] for c in rows(shared_stages(cfg), "SELECT response_id FROM llm_calls ORDER BY start_ns")] == ["x1", None]
    with pytest.raises(PipelineError, match=r"pipeline.llm_call_match '\(' is not a valid regular expression"):
        materialize_triplets(make_config(tmp_path, "pipeline.llm_call_match=("), run_id="r1", epoch=0)


def test_judge_calls_train_too_when_exclude_llm_call_in_reward_is_false(tmp_path):
    r = Rollout("ro1", task_id="t")
    agent = r.agent("solver", 0, 50, parent=r.span("rollout", 0, 100))
    r.call(10, 20, parent=agent, prompt=(1,))
    judge = r.span("reward function judge", 60, 90, parent=agent, attrs={"arclight.span.kind": "reward"})
    r.call(61, 80, parent=judge, prompt=(2,))
    r.reward(1.0, 85, parent=judge)
    counts = {}
    for exclude in (True, False):
        cfg = make_config(tmp_path / str(exclude), f"pipeline.exclude_llm_call_in_reward={str(exclude).lower()}")
        write(cfg.lake.path, [r])
        report = materialize_triplets(cfg, run_id="r1", epoch=0)
        triplets = load_triplets(cfg, run_id="r1", epoch=0, policy="default").to_pylist()
        counts[exclude] = (report.judge_calls, [t["prompt_token_ids"][0] for t in triplets])
    assert counts == {True: (1, [1]), False: (1, [1, 2])}


def test_retokenize_defaults_to_the_base_model_folder(tmp_path, monkeypatch):
    # fails before: "needs pipeline.tokenizer_path (or model.path)", though the docs promised this default
    from lightning_core.common import model

    monkeypatch.setattr(model, "DEFAULT_MODEL_DIR", tokenizer_cache_dir())
    model.load_tokenizer()  # the cached SmolLM2 tokenizer stands in for models/SmolLM2-135M-Instruct
    cfg = make_config(tmp_path, "pipeline.missing_token_ids=retokenize")
    write(cfg.lake.path, [_uninstrumented_rollout()])
    report = materialize_triplets(cfg, run_id="r1", epoch=0)
    assert report.policies[0].retokenized == 2
