-- llm_spans: one row per LLM span (sql/span_nodes.sql) with what it says about its model call:
-- token ids and logprobs (the gateway's typed columns of the lake, else the int arrays
-- prompt_token_ids / response_token_ids and the logprobs.content JSON that Agent Lightning and
-- other senders write; an empty or malformed list counts as missing), prompt messages and
-- response text (gateway, GenAI, OpenLLMetry flattened or OpenInference attributes), model,
-- policy version, response id (OpenInference keeps it inside output.value: the OpenAI response's
-- id, or LangChain's llm_output / generation metadata), choice index and usage.
-- The payload is read back from the lake here, for LLM spans only, so the earlier steps stay narrow.
-- Parameters: $run_id, $epoch (as in sql/span_nodes.sql). Reads: span_nodes, spans_raw.
WITH
llm_nodes AS (
    SELECT node, trace_id, span_id, file_key, file_row_number FROM span_nodes WHERE is_llm
),
payload AS (
    -- token ids leave the lake as INTEGER[] (the collector stores only ids in [0, 2^31)): half the
    -- bytes of BIGINT[] through this table, the triplets' sort and their Parquet encoding
    SELECT n.node, r.prompt_token_ids::INTEGER[] AS typed_prompt_ids, r.response_token_ids::INTEGER[] AS typed_response_ids,
        r.response_logprobs AS typed_logprobs, r.response_id,
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
            '$."arclight.llm.request_prompt"',        -- 17
            '$."prompt_token_ids"',                   -- 18 Agent Lightning, other senders
            '$."response_token_ids"',                 -- 19
            '$."logprobs.content"',                   -- 20
            '$."gen_ai.usage.prompt_tokens"',         -- 21 older OpenLLMetry, AgentOps
            '$."gen_ai.usage.completion_tokens"'      -- 22
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
sent_arrays AS (
    -- int arrays sent as attributes (JSON in the lake): read as numbers, kept only when every
    -- element is an integer id in [0, 2^31), as ingest requires of the gateway's
    SELECT *, TRY_CAST(f[18] AS DOUBLE[]) AS sent_prompt, TRY_CAST(f[19] AS DOUBLE[]) AS sent_response
    FROM payload
),
token_ids AS (
    SELECT * EXCLUDE (typed_prompt_ids, typed_response_ids, sent_prompt, sent_response),
        len(typed_response_ids) > 0 AS typed_ids,  -- the gateway's (arclight.llm.*) columns
        coalesce(CASE WHEN len(typed_prompt_ids) > 0 THEN typed_prompt_ids END,
                 CASE WHEN len(sent_prompt) > 0 AND list_bool_and(list_transform(sent_prompt,
                          lambda v: coalesce(v = floor(v) AND v BETWEEN 0 AND 2147483647, false)))
                      THEN sent_prompt::INTEGER[] END) AS prompt_token_ids,
        coalesce(CASE WHEN len(typed_response_ids) > 0 THEN typed_response_ids END,
                 CASE WHEN len(sent_response) > 0 AND list_bool_and(list_transform(sent_response,
                          lambda v: coalesce(v = floor(v) AND v BETWEEN 0 AND 2147483647, false)))
                      THEN sent_response::INTEGER[] END) AS response_token_ids,
        CASE WHEN json_valid(f[20]) THEN TRY_CAST(json_extract(f[20], '$[*].logprob') AS DOUBLE[]) END AS sent_logprobs
    FROM sent_arrays
),
fields AS (
    SELECT node, prompt_token_ids, response_token_ids, coalesce(typed_ids, false) AS typed_ids,
        -- sent logprobs count only when they match the response ids one to one
        coalesce(typed_logprobs, CASE WHEN len(sent_logprobs) = len(response_token_ids) THEN sent_logprobs END) AS response_logprobs,
        coalesce(f[1], to_json(f[17])::VARCHAR) AS gateway_messages,
        f[5] AS genai_messages,
        CASE WHEN json_valid(f[10]) THEN json_extract(f[10], '$.messages')::VARCHAR END AS oi_request_messages,
        coalesce(f[2], f[12], f[13],
                 CASE WHEN json_valid(f[6]) THEN json_extract_string(f[6], '$[0].parts[0].content') END,
                 CASE WHEN json_valid(f[11]) THEN json_extract_string(f[11], '$.choices[0].message.content') END
        ) AS response_text,
        f[3] AS policy_version,
        coalesce(f[4], f[7], f[9], f[8]) AS model,
        coalesce(response_id, CASE WHEN json_valid(f[11]) THEN list_filter(json_extract_string(f[11], [
            '$.id', '$.llm_output.id',
            '$.generations[0][0].message.kwargs.response_metadata.id', '$.generations[0][0].message.response_metadata.id'
        ]), lambda x: x IS NOT NULL)[1] END) AS response_id,
        coalesce(TRY_CAST(f[16] AS BIGINT), 0) AS choice_index,
        coalesce(TRY_CAST(f[14] AS BIGINT), TRY_CAST(f[21] AS BIGINT)) AS usage_input_tokens,
        coalesce(TRY_CAST(f[15] AS BIGINT), TRY_CAST(f[22] AS BIGINT)) AS usage_output_tokens,
        -- gen_ai.prompt.N.role/content (OpenLLMetry < 0.55), llm.input_messages.N.message.role/content
        -- (OpenInference): each such attribute as (N, role or content, value)
        list_transform(
            list_filter(json_keys(flat_attributes), lambda k: regexp_matches(k, '^(?:gen_ai\.prompt|llm\.input_messages)\.(\d+)\.(?:message\.)?(role|content)$')),
            lambda k: {'idx': TRY_CAST(regexp_extract(k, '^(?:gen_ai\.prompt|llm\.input_messages)\.(\d+)\.(?:message\.)?(role|content)$', 1) AS INTEGER),
                  'field': regexp_extract(k, '^(?:gen_ai\.prompt|llm\.input_messages)\.(\d+)\.(?:message\.)?(role|content)$', 2),
                  'value': json_extract_string(flat_attributes, '$."' || k || '"')}) AS flat_entries
    FROM token_ids
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
    len(prompt_token_ids) AS prompt_len, len(response_token_ids) AS response_len, typed_ids,
    response_logprobs IS NOT NULL AS has_logprobs,
    prompt_messages IS NOT NULL AS has_messages, response_text IS NOT NULL AS has_text,
    prompt_token_ids, response_token_ids, response_logprobs, prompt_messages, response_text
FROM messages
