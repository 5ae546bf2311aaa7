-- llm_calls: one row per model call. The gateway's span (authoritative token ids and logprobs)
-- and the instrumentation spans of the same call are merged: spans that share a
-- gen_ai.response.id (OpenInference keeps it inside output.value), and LLM spans nested in one
-- another (the Agents SDK's generation spans carry no response id), are one call.
-- Prompt messages and response text come from the gateway, else GenAI / OpenLLMetry /
-- OpenInference attributes. in_reward marks calls made inside a reward function (LLM judges).
-- n > 1 choices of one request are separate calls (arclight.llm.choice_index).
-- Reads: span_agents (sql/agents.sql).
WITH
llm_spans AS (
    SELECT s.* EXCLUDE (llm_attributes),
        json_extract(s.llm_attributes, [
            '$."arclight.llm.prompt_token_ids"',      -- 1
            '$."arclight.llm.response_token_ids"',    -- 2
            '$."arclight.llm.response_logprobs"'      -- 3
        ]) AS arrays,
        json_extract_string(s.llm_attributes, [
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
        s.llm_attributes
    FROM span_agents s
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
spans_of_call AS (
    SELECT f.* EXCLUDE (llm_attributes, gateway_messages, genai_messages, oi_request_messages, needs_flat_messages),
        coalesce(f.gateway_messages, f.genai_messages, fm.messages, f.oi_request_messages) AS prompt_messages,
        f.response_token_ids IS NOT NULL AS from_gateway,
        -- n > 1 choices: the gateway writes one span per choice under one response id
        coalesce(f.response_id || '#' || f.choice_index,
                 max(f.response_id || '#' || f.choice_index) OVER (PARTITION BY f.grp, f.llm_root),
                 'span:' || f.llm_root::VARCHAR) AS call_key
    FROM fields f LEFT JOIN flat_messages fm USING (node)
),
calls AS (
    SELECT grp, call_key,
        any_value(run_id) AS run_id, any_value(epoch) AS epoch,
        any_value(rollout_id) AS rollout_id, any_value(task_id) AS task_id, any_value(attempt) AS attempt,
        first(node ORDER BY from_gateway DESC, depth, start_ns) AS node,
        first(trace_id ORDER BY from_gateway DESC, depth, start_ns) AS trace_id,
        first(span_id ORDER BY from_gateway DESC, depth, start_ns) AS span_id,
        -- the call's place in the tree: its outermost span
        first(parent_node ORDER BY depth, start_ns) AS parent_node,
        min(start_ns) AS start_ns, max(end_ns) AS end_ns,
        first(agent_name ORDER BY depth, start_ns) FILTER (WHERE agent_name IS NOT NULL) AS agent_name,
        first(agent_span_id ORDER BY depth, start_ns) FILTER (WHERE agent_name IS NOT NULL) AS agent_span_id,
        bool_or(in_reward) AS in_reward,
        first(prompt_token_ids ORDER BY from_gateway DESC, depth) FILTER (WHERE prompt_token_ids IS NOT NULL) AS prompt_token_ids,
        first(response_token_ids ORDER BY depth) FILTER (WHERE response_token_ids IS NOT NULL) AS response_token_ids,
        first(response_logprobs ORDER BY from_gateway DESC, depth) FILTER (WHERE response_logprobs IS NOT NULL) AS response_logprobs,
        first(prompt_messages ORDER BY from_gateway DESC, depth) FILTER (WHERE prompt_messages IS NOT NULL) AS prompt_messages,
        first(response_text ORDER BY from_gateway DESC, depth) FILTER (WHERE response_text IS NOT NULL) AS response_text,
        first(policy_version ORDER BY from_gateway DESC, depth) FILTER (WHERE policy_version IS NOT NULL) AS policy_version,
        first(model ORDER BY from_gateway DESC, depth) FILTER (WHERE model IS NOT NULL) AS model,
        first(response_id) FILTER (WHERE response_id IS NOT NULL) AS response_id,
        max(usage_input_tokens) AS usage_input_tokens,
        max(usage_output_tokens) AS usage_output_tokens,
        bool_or(status_code = 'ERROR') AS failed,
        count(*) AS span_count,
        list(span_id ORDER BY depth, start_ns) AS span_ids
    FROM spans_of_call
    GROUP BY grp, call_key
)
SELECT *,
    list_filter([
        CASE WHEN prompt_token_ids IS NULL OR response_token_ids IS NULL THEN 'missing_token_ids' END,
        CASE WHEN response_logprobs IS NULL THEN 'missing_logprobs' END,
        CASE WHEN in_reward THEN 'judge' END,
        CASE WHEN failed THEN 'failed_call' END
    ], lambda x: x IS NOT NULL) AS flags
FROM calls
