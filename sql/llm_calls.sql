-- llm_calls: one row per model call. The gateway's span (authoritative token ids and logprobs)
-- and the instrumentation spans of the same call are merged: spans that share a
-- gen_ai.response.id (OpenInference keeps it inside output.value), and LLM spans nested in one
-- another (the Agents SDK's generation spans carry no response id), are one call.
-- Prompt messages and response text come from the gateway, else GenAI / OpenLLMetry /
-- OpenInference attributes. in_reward marks calls made inside a reward function (LLM judges).
-- n > 1 choices of one request are separate calls (arclight.llm.choice_index).
-- Reads: span_agents (sql/agents.sql), repaired_spans (its llm_attributes).
WITH
llm_spans AS (
    SELECT s.*,
        json_extract(r.llm_attributes, [
            '$."arclight.llm.prompt_token_ids"',      -- 1
            '$."arclight.llm.response_token_ids"',    -- 2
            '$."arclight.llm.response_logprobs"'      -- 3
        ]) AS arrays,
        json_extract_string(r.llm_attributes, [
            '$."arclight.llm.request_messages"',      -- 1
            '$."arclight.llm.response_text"',         -- 2
            '$."arclight.policy.version"',            -- 3
            '$."arclight.llm.served_model"',          -- 4
            '$."gen_ai.response.id"',                 -- 5
            '$."gen_ai.input.messages"',              -- 6
            '$."gen_ai.output.messages"',             -- 7
            '$."gen_ai.response.model"',              -- 8
            '$."gen_ai.request.model"',               -- 9
            '$."llm.model_name"',                     -- 10
            '$."input.value"',                        -- 11
            '$."output.value"',                       -- 12
            '$."gen_ai.completion.0.content"',        -- 13
            '$."llm.output_messages.0.message.content"', -- 14
            '$."gen_ai.usage.input_tokens"',          -- 15
            '$."gen_ai.usage.output_tokens"',         -- 16
            '$."arclight.llm.choice_index"',          -- 17
            '$."arclight.llm.request_prompt"'         -- 18
        ]) AS f,
        r.llm_attributes
    FROM span_agents s JOIN repaired_spans r USING (node)
    WHERE s.is_llm
),
fields AS (
    SELECT * EXCLUDE (arrays, f, llm_attributes),
        CASE json_type(arrays[1]) WHEN 'ARRAY' THEN TRY_CAST(arrays[1] AS BIGINT[])
             WHEN 'VARCHAR' THEN TRY_CAST(TRY_CAST(arrays[1] ->> '$' AS JSON) AS BIGINT[]) END AS prompt_token_ids,
        CASE json_type(arrays[2]) WHEN 'ARRAY' THEN TRY_CAST(arrays[2] AS BIGINT[])
             WHEN 'VARCHAR' THEN TRY_CAST(TRY_CAST(arrays[2] ->> '$' AS JSON) AS BIGINT[]) END AS response_token_ids,
        CASE json_type(arrays[3]) WHEN 'ARRAY' THEN TRY_CAST(arrays[3] AS DOUBLE[])
             WHEN 'VARCHAR' THEN TRY_CAST(TRY_CAST(arrays[3] ->> '$' AS JSON) AS DOUBLE[]) END AS response_logprobs,
        coalesce(f[1], to_json(f[18])::VARCHAR) AS gateway_messages,
        f[6] AS genai_messages,
        CASE WHEN json_valid(f[11]) THEN json_extract(f[11], '$.messages')::VARCHAR END AS oi_request_messages,
        coalesce(f[2], f[13], f[14],
                 CASE WHEN json_valid(f[7]) THEN json_extract_string(f[7], '$[0].parts[0].content') END,
                 CASE WHEN json_valid(f[12]) THEN json_extract_string(f[12], '$.choices[0].message.content') END
        ) AS response_text,
        f[3] AS policy_version,
        coalesce(f[4], f[8], f[10], f[9]) AS model,
        coalesce(f[5], CASE WHEN json_valid(f[12]) THEN json_extract_string(f[12], '$.id') END) AS response_id,
        coalesce(TRY_CAST(f[17] AS BIGINT), 0) AS choice_index,
        TRY_CAST(f[15] AS BIGINT) AS usage_input_tokens,
        TRY_CAST(f[16] AS BIGINT) AS usage_output_tokens,
        f[1] IS NULL AND f[18] IS NULL AND f[6] IS NULL AND NOT coalesce(json_valid(f[11]), false) AS needs_flat_messages,
        llm_attributes
    FROM llm_spans
),
flat_entries AS (
    -- OpenLLMetry < 0.55 (gen_ai.prompt.N.role/content) and OpenInference
    -- (llm.input_messages.N.message.role/content) flatten the prompt into numbered attributes
    SELECT f.node, e.key, e.value ->> '$' AS value,
        regexp_extract(e.key, '^(?:gen_ai\.prompt|llm\.input_messages)\.(\d+)\.(?:message\.)?(role|content)$', ['idx', 'field']) AS m
    FROM fields f, json_each(f.llm_attributes) e
    WHERE f.needs_flat_messages AND (e.key LIKE 'gen_ai.prompt.%' OR e.key LIKE 'llm.input_messages.%')
),
flat_messages AS (
    SELECT node, to_json(list({'role': role, 'content': content} ORDER BY idx))::VARCHAR AS messages
    FROM (
        SELECT node, TRY_CAST(m.idx AS INTEGER) AS idx,
               max(value) FILTER (WHERE m.field = 'role') AS role,
               max(value) FILTER (WHERE m.field = 'content') AS content
        FROM flat_entries WHERE m.idx <> '' GROUP BY node, m.idx
    )
    GROUP BY node
),
cluster_ids AS (
    -- the response id of each cluster of nested LLM spans (narrow, so the window stays cheap)
    SELECT grp, llm_root, max(response_id || '#' || choice_index) AS cluster_key
    FROM fields GROUP BY grp, llm_root
),
spans_of_call AS MATERIALIZED (
    SELECT f.* EXCLUDE (llm_attributes, gateway_messages, genai_messages, oi_request_messages, needs_flat_messages),
        coalesce(f.gateway_messages, f.genai_messages, fm.messages, f.oi_request_messages) AS prompt_messages,
        f.response_token_ids IS NOT NULL AS from_gateway,
        -- n > 1 choices: the gateway writes one span per choice under one response id
        coalesce(f.response_id || '#' || f.choice_index, k.cluster_key, 'span:' || f.llm_root::VARCHAR) AS call_key,
        -- which span a field is taken from: the gateway's first, then the outermost
        (CASE WHEN f.response_token_ids IS NOT NULL THEN 0 ELSE 1 END)::HUGEINT * 10000000000000000000000
            + f.depth::HUGEINT * 10000000000000000000 + f.start_ns AS gateway_first,
        f.depth::HUGEINT * 10000000000000000000 + f.start_ns AS outermost_first
    FROM fields f
    LEFT JOIN flat_messages fm USING (node)
    LEFT JOIN cluster_ids k ON k.grp = f.grp AND k.llm_root = f.llm_root
),
call_spans AS (
    -- per call, on narrow columns: which span each field comes from
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
        arg_min(agent_span_id, outermost_first) FILTER (WHERE agent_name IS NOT NULL) AS agent_span_id,
        bool_or(in_reward) AS in_reward,
        arg_min(node, gateway_first) FILTER (WHERE response_token_ids IS NOT NULL) AS tokens_node,
        arg_min(node, gateway_first) FILTER (WHERE prompt_token_ids IS NOT NULL) AS prompt_ids_node,
        arg_min(node, gateway_first) FILTER (WHERE response_logprobs IS NOT NULL) AS logprobs_node,
        arg_min(node, gateway_first) FILTER (WHERE prompt_messages IS NOT NULL) AS messages_node,
        arg_min(node, gateway_first) FILTER (WHERE response_text IS NOT NULL) AS text_node,
        arg_min(policy_version, gateway_first) FILTER (WHERE policy_version IS NOT NULL) AS policy_version,
        arg_min(model, gateway_first) FILTER (WHERE model IS NOT NULL) AS model,
        max(response_id) AS response_id,
        max(usage_input_tokens) AS usage_input_tokens,
        max(usage_output_tokens) AS usage_output_tokens,
        bool_or(status_code = 'ERROR') AS failed,
        count(*) AS span_count
    FROM spans_of_call
    GROUP BY grp, call_key
),
calls AS (
    -- then the wide fields, each from its chosen span
    SELECT c.* EXCLUDE (tokens_node, prompt_ids_node, logprobs_node, messages_node, text_node),
        p.prompt_token_ids, t.response_token_ids, l.response_logprobs, m.prompt_messages, x.response_text
    FROM call_spans c
    LEFT JOIN spans_of_call p ON p.node = c.prompt_ids_node
    LEFT JOIN spans_of_call t ON t.node = c.tokens_node
    LEFT JOIN spans_of_call l ON l.node = c.logprobs_node
    LEFT JOIN spans_of_call m ON m.node = c.messages_node
    LEFT JOIN spans_of_call x ON x.node = c.text_node
)
SELECT *,
    list_filter([
        CASE WHEN prompt_token_ids IS NULL OR response_token_ids IS NULL THEN 'missing_token_ids' END,
        CASE WHEN response_logprobs IS NULL THEN 'missing_logprobs' END,
        CASE WHEN in_reward THEN 'judge' END,
        CASE WHEN failed THEN 'failed_call' END
    ], lambda x: x IS NOT NULL) AS flags
FROM calls
