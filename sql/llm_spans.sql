-- llm_spans: one row per LLM span (sql/span_nodes.sql) with what it says about its model call: the
-- gateway's token ids and logprobs (typed columns of the lake), prompt messages and response
-- text (gateway, GenAI, OpenLLMetry flattened or OpenInference attributes), model, policy
-- version, response id (OpenInference keeps it inside output.value), choice index and usage.
-- The payload is read back from the lake here, for LLM spans only, so the earlier steps stay narrow.
-- Parameters: $run_id, $epoch (as in sql/span_nodes.sql). Reads: span_nodes, spans_raw.
WITH
llm_nodes AS (
    SELECT node, trace_id, span_id, file_key, file_row_number FROM span_nodes WHERE is_llm
),
payload AS (
    -- token ids leave the lake as INTEGER[] (the collector stores only ids in [0, 2^31)): half the
    -- bytes of BIGINT[] through this table, the triplets' sort and their Parquet encoding
    SELECT n.node, r.prompt_token_ids::INTEGER[] AS prompt_token_ids, r.response_token_ids::INTEGER[] AS response_token_ids,
        r.response_logprobs, r.response_id,
        json_extract_string(r.attributes, [
            '$."arclight.llm.request_messages"',      -- 1
            '$."arclight.llm.response_text"',         -- 2
            '$."arclight.policy.version"',            -- 3
            '$."arclight.llm.served_model"',          -- 4
            '$."gen_ai.input.messages"',              -- 5
            '$."gen_ai.output.messages"',             -- 6
            '$."gen_ai.response.model"',              -- 7
            '$."gen_ai.request.model"',               -- 8
            '$."llm.model_name"',                     -- 9
            '$."input.value"',                        -- 10
            '$."output.value"',                       -- 11
            '$."gen_ai.completion.0.content"',        -- 12
            '$."llm.output_messages.0.message.content"', -- 13
            '$."gen_ai.usage.input_tokens"',          -- 14
            '$."gen_ai.usage.output_tokens"',         -- 15
            '$."arclight.llm.choice_index"',          -- 16
            '$."arclight.llm.request_prompt"'         -- 17
        ]) AS f,
        -- OpenLLMetry < 0.55 and OpenInference flatten the prompt into numbered attributes
        CASE WHEN f[1] IS NULL AND f[17] IS NULL AND f[5] IS NULL AND NOT coalesce(json_valid(f[10]), false)
             THEN r.attributes END AS flat_attributes
    FROM spans_raw r
    JOIN llm_nodes n ON n.file_row_number = r.file_row_number AND n.file_key = hash(r.filename)
     AND n.trace_id = r.trace_id AND n.span_id = r.span_id
    WHERE r.run_id IS NOT DISTINCT FROM $run_id
      AND ($epoch IS NULL OR r.epoch = $epoch)
),
fields AS (
    SELECT node, prompt_token_ids, response_token_ids, response_logprobs,
        coalesce(f[1], to_json(f[17])::VARCHAR) AS gateway_messages,
        f[5] AS genai_messages,
        CASE WHEN json_valid(f[10]) THEN json_extract(f[10], '$.messages')::VARCHAR END AS oi_request_messages,
        coalesce(f[2], f[12], f[13],
                 CASE WHEN json_valid(f[6]) THEN json_extract_string(f[6], '$[0].parts[0].content') END,
                 CASE WHEN json_valid(f[11]) THEN json_extract_string(f[11], '$.choices[0].message.content') END
        ) AS response_text,
        f[3] AS policy_version,
        coalesce(f[4], f[7], f[9], f[8]) AS model,
        coalesce(response_id, CASE WHEN json_valid(f[11]) THEN json_extract_string(f[11], '$.id') END) AS response_id,
        coalesce(TRY_CAST(f[16] AS BIGINT), 0) AS choice_index,
        TRY_CAST(f[14] AS BIGINT) AS usage_input_tokens,
        TRY_CAST(f[15] AS BIGINT) AS usage_output_tokens,
        -- gen_ai.prompt.N.role/content (OpenLLMetry < 0.55), llm.input_messages.N.message.role/content
        -- (OpenInference): each such attribute as (N, role or content, value)
        list_transform(
            list_filter(json_keys(flat_attributes), lambda k: regexp_matches(k, '^(?:gen_ai\.prompt|llm\.input_messages)\.(\d+)\.(?:message\.)?(role|content)$')),
            lambda k: {'idx': TRY_CAST(regexp_extract(k, '^(?:gen_ai\.prompt|llm\.input_messages)\.(\d+)\.(?:message\.)?(role|content)$', 1) AS INTEGER),
                  'field': regexp_extract(k, '^(?:gen_ai\.prompt|llm\.input_messages)\.(\d+)\.(?:message\.)?(role|content)$', 2),
                  'value': json_extract_string(flat_attributes, '$."' || k || '"')}) AS flat_entries
    FROM payload
),
messages AS (
    SELECT *,
        coalesce(gateway_messages, genai_messages,
            -- flattened messages: one {role, content} per N, in N order
            CASE WHEN len(flat_entries) > 0 THEN to_json(list_transform(
                list_sort(list_distinct(list_transform(flat_entries, lambda e: e.idx))),
                lambda i: {'role': list_max(list_transform(list_filter(flat_entries, lambda e: e.idx = i AND e.field = 'role'), lambda e: e.value)),
                      'content': list_max(list_transform(list_filter(flat_entries, lambda e: e.idx = i AND e.field = 'content'), lambda e: e.value))}
            ))::VARCHAR END,
            oi_request_messages) AS prompt_messages
    FROM fields
)
SELECT node, response_id, choice_index, policy_version, model, usage_input_tokens, usage_output_tokens,
    -- narrow facts about the wide fields, so sql/calls.sql merges spans without touching them
    len(prompt_token_ids) AS prompt_len, len(response_token_ids) AS response_len,
    response_logprobs IS NOT NULL AS has_logprobs,
    prompt_messages IS NOT NULL AS has_messages, response_text IS NOT NULL AS has_text,
    prompt_token_ids, response_token_ids, response_logprobs, prompt_messages, response_text
FROM messages
