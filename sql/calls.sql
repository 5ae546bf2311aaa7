-- calls: one row per model call, narrow. The gateway's span (authoritative token ids and logprobs)
-- and the instrumentation spans of the same call are merged: spans that share a response id
-- (gen_ai.response.id, or inside OpenInference's output.value), LLM spans nested in one another
-- in the tree, and LLM spans that another LLM span encloses in time (two instrumentations whose
-- spans are not nested, or the Agents SDK's generation spans, which carry no response id) are one
-- call -- unless both sides carry different response ids: then the ids decide.
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
        -- which span a field is taken from: the gateway's first (token ids in its typed columns),
        -- then one that sent token ids as attributes, then the outermost
        (CASE WHEN l.typed_ids THEN 0 WHEN l.response_len IS NOT NULL THEN 1 ELSE 2 END)::HUGEINT * 10000000000000000000000
            + s.depth::HUGEINT * 10000000000000000000 + s.start_ns AS gateway_first,
        s.depth::HUGEINT * 10000000000000000000 + s.start_ns AS outermost_first
    FROM span_owners s JOIN llm_spans l USING (node)
),
clusters AS MATERIALIZED (
    -- LLM spans nested in the tree (under one outermost LLM span, llm_root): their time range and response id
    SELECT grp, llm_root, min(start_ns) AS start_ns, max(end_ns) AS end_ns,
           max(response_id || '#' || choice_index) AS cluster_id
    FROM spans_of_call GROUP BY grp, llm_root
),
undecided_rollouts AS (
    -- only where a cluster has no response id can time decide which clusters are one call
    SELECT DISTINCT grp FROM clusters WHERE cluster_id IS NULL
),
enclosed AS (
    SELECT c.*, coalesce(max(c.end_ns) OVER (PARTITION BY c.grp ORDER BY c.start_ns, c.end_ns DESC, c.llm_root
                                 ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) >= c.end_ns, false) AS is_enclosed
    FROM clusters c SEMI JOIN undecided_rollouts u USING (grp)
),
outermost AS (
    -- the outermost cluster that encloses each one in time: the latest earlier cluster that nothing encloses
    SELECT *, last_value(CASE WHEN NOT is_enclosed THEN {'root': llm_root, 'id': cluster_id} END IGNORE NULLS)
                  OVER (PARTITION BY grp ORDER BY start_ns, end_ns DESC, llm_root ROWS UNBOUNDED PRECEDING) AS head
    FROM enclosed
),
time_merged AS (
    SELECT grp, llm_root, cluster_id,
        CASE WHEN cluster_id IS NULL OR head.id IS NULL THEN head.root ELSE llm_root END AS call_root
    FROM outermost
),
cluster_keys AS (
    SELECT grp, llm_root, llm_root AS call_root, cluster_id AS call_id
    FROM clusters ANTI JOIN undecided_rollouts USING (grp)
    UNION ALL
    SELECT grp, llm_root, call_root, max(cluster_id) OVER (PARTITION BY grp, call_root) AS call_id
    FROM time_merged
),
keyed AS (
    SELECT f.*,
        -- n > 1 choices: the gateway writes one span per choice under one response id
        coalesce(f.response_id || '#' || f.choice_index, k.call_id, 'span:' || k.call_root::VARCHAR) AS call_key
    FROM spans_of_call f
    JOIN cluster_keys k ON k.grp = f.grp AND k.llm_root = f.llm_root
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
