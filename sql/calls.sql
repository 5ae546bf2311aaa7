-- calls: one row per model call, narrow. The gateway's span (authoritative token ids and logprobs)
-- and the instrumentation spans of the same call are merged: spans that share a
-- gen_ai.response.id (OpenInference keeps it inside output.value), and LLM spans nested in one
-- another (the Agents SDK's generation spans carry no response id), are one call.
-- Each field comes from the gateway's span when it has it, else from the outermost span.
-- in_reward marks calls made inside a reward function (LLM judges).
-- n > 1 choices of one request are separate calls (arclight.llm.choice_index).
-- The merge runs on narrow columns: each wide field (token ids, logprobs, messages, text) is
-- named by the node it comes from, and sql/llm_calls.sql joins them in.
-- Reads: span_owners (sql/span_owners.sql), llm_spans (sql/llm_spans.sql), span_nodes.
WITH
spans_of_call AS MATERIALIZED (
    SELECT s.run_id, s.epoch, s.rollout_id, s.task_id, s.attempt, s.grp, s.node, s.trace_id, s.span_id,
        s.parent_node, s.start_ns, s.end_ns, s.status_code, s.agent_name, s.agent_node, s.in_reward,
        s.llm_root, l.response_id, l.choice_index, l.policy_version, l.model,
        l.usage_input_tokens, l.usage_output_tokens,
        l.prompt_len, l.response_len,
        l.prompt_len IS NOT NULL AS has_prompt_ids,
        l.response_len IS NOT NULL AS has_response_ids,
        l.has_logprobs, l.has_messages, l.has_text,
        -- which span a field is taken from: the gateway's first, then the outermost
        (CASE WHEN l.response_len IS NOT NULL THEN 0 ELSE 1 END)::HUGEINT * 10000000000000000000000
            + s.depth::HUGEINT * 10000000000000000000 + s.start_ns AS gateway_first,
        s.depth::HUGEINT * 10000000000000000000 + s.start_ns AS outermost_first
    FROM span_owners s JOIN llm_spans l USING (node)
),
cluster_ids AS (
    -- the response id of each cluster of nested LLM spans
    SELECT grp, llm_root, max(response_id || '#' || choice_index) AS cluster_key
    FROM spans_of_call GROUP BY grp, llm_root
),
keyed AS (
    SELECT f.*,
        -- n > 1 choices: the gateway writes one span per choice under one response id
        coalesce(f.response_id || '#' || f.choice_index, k.cluster_key, 'span:' || f.llm_root::VARCHAR) AS call_key
    FROM spans_of_call f
    LEFT JOIN cluster_ids k ON k.grp = f.grp AND k.llm_root = f.llm_root
),
call_spans AS (
    -- per call: which span each field comes from
    SELECT grp, call_key,
        any_value(run_id) AS run_id, any_value(epoch) AS epoch,
        any_value(rollout_id) AS rollout_id, any_value(task_id) AS task_id, any_value(attempt) AS attempt,
        arg_min(node, gateway_first) AS node,
        arg_min(trace_id, gateway_first) AS trace_id,
        arg_min(span_id, gateway_first) AS span_id,
        -- the call's place in the tree: its outermost span
        arg_min(parent_node, outermost_first) AS parent_node,
        arg_min(span_id, outermost_first) AS outer_span_id,
        min(start_ns) AS start_ns, max(end_ns) AS end_ns,
        arg_min(agent_name, outermost_first) FILTER (WHERE agent_name IS NOT NULL) AS agent_name,
        arg_min(agent_node, outermost_first) FILTER (WHERE agent_name IS NOT NULL) AS agent_node,
        bool_or(in_reward) AS in_reward,
        arg_min(node, gateway_first) FILTER (WHERE has_response_ids) AS tokens_node,
        arg_min(node, gateway_first) FILTER (WHERE has_prompt_ids) AS prompt_ids_node,
        arg_min(prompt_len, gateway_first) FILTER (WHERE has_prompt_ids) AS prompt_tokens,
        arg_min(response_len, gateway_first) FILTER (WHERE has_response_ids) AS response_tokens,
        arg_min(node, gateway_first) FILTER (WHERE has_logprobs) AS logprobs_node,
        arg_min(node, gateway_first) FILTER (WHERE has_messages) AS messages_node,
        arg_min(node, gateway_first) FILTER (WHERE has_text) AS text_node,
        arg_min(policy_version, gateway_first) FILTER (WHERE policy_version IS NOT NULL) AS policy_version,
        arg_min(model, gateway_first) FILTER (WHERE model IS NOT NULL) AS model,
        max(response_id) AS response_id,
        max(usage_input_tokens) AS usage_input_tokens,
        max(usage_output_tokens) AS usage_output_tokens,
        bool_or(status_code = 'ERROR') AS failed,
        count(*) AS span_count
    FROM keyed
    GROUP BY grp, call_key
)
SELECT c.* EXCLUDE (agent_node), a.span_id AS agent_span_id,
    -- one span gives every wide field (the usual case: the gateway's span); readers of the wide
    -- fields (sql/llm_calls.sql, sql/advantages.sql) join that span once
    coalesce(prompt_ids_node, tokens_node) IS NOT DISTINCT FROM tokens_node
        AND coalesce(logprobs_node, tokens_node) IS NOT DISTINCT FROM tokens_node
        AND coalesce(messages_node, tokens_node) IS NOT DISTINCT FROM tokens_node
        AND coalesce(text_node, tokens_node) IS NOT DISTINCT FROM tokens_node AS single_source,
    list_filter([
        CASE WHEN prompt_ids_node IS NULL OR tokens_node IS NULL THEN 'missing_token_ids' END,
        CASE WHEN logprobs_node IS NULL THEN 'missing_logprobs' END,
        CASE WHEN in_reward THEN 'judge' END,
        CASE WHEN failed THEN 'failed_call' END
    ], lambda x: x IS NOT NULL) AS flags
FROM call_spans c
LEFT JOIN span_nodes a ON a.node = c.agent_node
