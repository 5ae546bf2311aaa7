-- span_nodes: one narrow row per span of one (run, epoch) -- or of the production traces when
-- $run_id is NULL -- de-duplicated on (trace_id, span_id), of the rollout's last attempt only,
-- classified (agent, llm, tool, reward, reward scope, rollout) and numbered (node: the kept copy's
-- file and row, file_index * 2^32 + file_row_number; one branch of spans_raw is read, so it is
-- unique). No payload: LLM spans' messages and token ids are read back from the lake by
-- sql/llm_spans.sql.
-- A reward (is_reward) is a span that gives a reward value, or names a reward without one:
-- arclight.reward.value (emit_reward, or alone on any span), arclight.reward.name /
-- arclight.reward.invalid (emit_reward of None or a non-number), Agent Lightning's
-- agentlightning.reward.0.value, AgentOps' {"type": "reward", ...} output, or Agent Lightning's
-- pre-0.3 annotation. tool_reward: a tool span's own reward (arclight.tool.reward, a number). A reward scope (is_reward_scope: any span of kind reward -- a reward
-- function when it has no value and no name --, AgentOps' reward output, Agent Lightning's
-- agentlightning.reward operation) marks the LLM calls under it as judge calls (sql/agents.sql).
-- Parameters: $run_id, $epoch (NULL = every epoch of the run), $llm_call_match (a regex on span
-- names that marks extra spans as LLM calls; NULL = attributes alone decide).
WITH
selected AS (
    SELECT run_id, epoch, rollout_id, task_id, attempt, trace_id, span_id, parent_id, name,
           start_ns, end_ns, status_code, span_kind, agent_name, reward_value, received_ns,
           hash(filename) AS file_key, file_row_number,  -- which stored copy (sql/llm_spans.sql reads it back)
           -- numbered where it is read, in parallel (a row_number() over 1M rows runs on one thread)
           (file_index::BIGINT << 32) | file_row_number AS node,
           contains(events, '"name":"exception"') AS has_exception,
           -- a tool's own reward for the call that caused it (sql/rewards.sql), parsed where the text names it
           CASE WHEN span_kind IS DISTINCT FROM 'llm' AND contains(attributes, 'arclight.tool.reward')
                THEN TRY_CAST(json_extract_string(attributes, '$."arclight.tool.reward"') AS DOUBLE) END AS tool_reward,
           -- the attribute JSON is parsed only for spans whose typed columns leave something open
           -- (SDK and gateway spans of a rollout carry all of it in typed columns; a reward span's
           -- name tells a reward from a reward function)
           CASE WHEN span_kind IS NULL OR span_kind IN ('rollout', 'reward') OR rollout_id IS NULL OR task_id IS NULL
                     OR attempt IS NULL OR (span_kind = 'agent' AND agent_name IS NULL)
           THEN json_extract_string(attributes, [
               '$."gen_ai.agent.name"',                               -- 1
               '$."recipient_agent_type"',                            -- 2
               '$."langchain.chain.type"',                            -- 3
               '$."agentops.span.kind"',                              -- 4
               '$."operation.name"',                                  -- 5
               '$."executor.id"',                                     -- 6
               '$."openinference.span.kind"',                         -- 7
               '$."metadata"',                                        -- 8
               '$."traceloop.association.properties.langgraph_node"', -- 9
               '$."gen_ai.operation.name"',                           -- 10
               '$."llm.request.type"',                                -- 11
               '$."arclight.rollout_id"',                             -- 12
               '$."arclight.task_id"',                                -- 13
               '$."arclight.attempt"',                                -- 14
               '$."traceloop.span.kind"',                             -- 15
               '$."arclight.rollout.status"',                         -- 16
               '$."agentlightning.reward.0.value"',                   -- 17
               '$."prompt_token_ids"[0]',                             -- 18 Agent Lightning / other senders' token ids
               '$."response_token_ids"[0]',                           -- 19
               '$."gen_ai.request.type"',                             -- 20 newer AgentOps
               '$."agentops.task.output"',                            -- 21 AgentOps reward payload
               '$."agentops.entity.output"',                          -- 22
               '$."agentlightning.operation.name"',                   -- 23 Agent Lightning reward operation
               '$."reward"',                                          -- 24 Agent Lightning < 0.3 annotation
               '$."arclight.reward.name"',                            -- 25
               '$."arclight.reward.invalid"',                         -- 26
               '$."graph.node.id"'                                    -- 27 OpenInference's agent name (AutoGen, CrewAI)
           ]) ELSE [NULL]::VARCHAR[] END AS a
    FROM spans_raw
    WHERE run_id IS NOT DISTINCT FROM $run_id
      AND ($epoch IS NULL OR epoch = $epoch)
),
reward_payloads AS (
    -- AgentOps' reward output, JSON text {"type": "reward", "value": v}: parsed where there is one
    SELECT *, CASE WHEN json_valid(coalesce(a[21], a[22]))
                   THEN json_extract_string(coalesce(a[21], a[22]), ['$.type', '$.value']) END AS agentops_output
    FROM selected
),
classified AS MATERIALIZED (
    SELECT
        run_id, epoch,
        coalesce(rollout_id, a[12]) AS rollout_id,
        coalesce(task_id, a[13]) AS task_id,
        coalesce(attempt, TRY_CAST(a[14] AS BIGINT)) AS attempt,
        coalesce(rollout_id, a[12], trace_id) AS grp,
        trace_id, span_id, parent_id, name, start_ns, end_ns, status_code, received_ns,
        file_key, file_row_number, node, hash(trace_id, span_id) AS span_key,
        coalesce(span_kind = 'llm' OR a[10] IN ('chat', 'text_completion') OR a[7] = 'LLM'
                 OR a[11] IN ('chat', 'completion') OR a[20] IN ('chat', 'completion')
                 OR a[18] IS NOT NULL OR a[19] IS NOT NULL, false)
            -- a regex is bound, never pasted; NULL skips the match altogether
            OR CASE WHEN $llm_call_match IS NULL THEN false ELSE coalesce(regexp_matches(name, $llm_call_match), false) END AS is_llm,
        coalesce(span_kind = 'tool' OR a[10] = 'execute_tool' OR a[7] = 'TOOL' OR a[15] = 'tool'
                 OR a[4] = 'tool', false) AS is_tool,
        -- a span of kind reward with neither value nor reward name is a reward function, not a reward
        coalesce(reward_value IS NOT NULL OR a[17] IS NOT NULL OR a[25] IS NOT NULL OR a[26] IS NOT NULL
                 OR agentops_output[1] = 'reward'
                 OR (name = 'agentlightning.annotation' AND a[24] IS NOT NULL), false) AS is_reward,
        coalesce(span_kind = 'reward' OR agentops_output[1] = 'reward'
                 OR (name = 'agentlightning.operation' AND a[23] = 'agentlightning.reward'), false) AS is_reward_scope,
        coalesce(reward_value, CASE WHEN agentops_output[1] = 'reward' THEN TRY_CAST(agentops_output[2] AS DOUBLE) END,
                 CASE WHEN name = 'agentlightning.annotation' THEN TRY_CAST(a[24] AS DOUBLE) END) AS reward_value,
        -- the agent's name, by convention (docs/span-conventions.md, "Agent names"); AutoGen's agent types carry the
        -- team's id (<agent>_<uuid>, new every run): dropped, so a name is the same in every rollout
        coalesce(agent_name, a[1], CASE WHEN a[4] = 'agent' THEN a[5] END,
                 regexp_replace(a[2], '_[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}$', ''), a[6],
                 CASE WHEN json_valid(a[8]) THEN json_extract_string(a[8], '$.langgraph_node') END,
                 a[9], a[3], CASE WHEN a[7] = 'AGENT' THEN coalesce(a[27], name) END) AS agent_label,
        -- named by its span name alone (an OpenInference AGENT span without graph.node.id, e.g. 'solver.run'): an
        -- enclosing agent whose name it starts with is the same agent, and its name wins (sql/agents.sql)
        coalesce(agent_name, a[1], a[2], a[6], a[8], a[9], a[3], a[27]) IS NULL AND a[4] IS DISTINCT FROM 'agent'
            AND a[7] = 'AGENT' AS agent_label_from_name,
        coalesce(span_kind = 'rollout', false) AS is_rollout,
        a[16] AS rollout_status,
        has_exception, tool_reward
    FROM reward_payloads
),
duplicated AS (
    -- OTLP retries and compaction can store a span twice (rare): find them on one hashed key
    SELECT span_key FROM classified GROUP BY span_key HAVING count(*) > 1
),
deduped AS (
    SELECT c.* FROM classified c ANTI JOIN duplicated d USING (span_key)
    UNION ALL
    (SELECT c.* FROM classified c SEMI JOIN duplicated d USING (span_key)
     QUALIFY row_number() OVER (PARTITION BY trace_id, span_id ORDER BY received_ns DESC) = 1)
),
attempt_starts AS (
    SELECT grp, attempt, min(start_ns) AS first_start FROM deduped WHERE attempt IS NOT NULL GROUP BY grp, attempt
),
latest_attempt AS (
    -- a retried rollout trains on its last attempt only; spans that carry no attempt number (a
    -- gateway the rollout was registered with without one) count when they start within it
    SELECT grp, max(attempt) AS attempt, arg_max(first_start, attempt) AS first_start FROM attempt_starts GROUP BY grp
)
SELECT d.* EXCLUDE (is_tool),
    d.is_tool AND NOT d.is_llm AS is_tool,
    -- a reward value set on an agent span keeps it an agent; a reward function is not one
    d.agent_label IS NOT NULL AND NOT (d.is_llm OR d.is_tool OR d.is_reward_scope) AS is_agent
FROM deduped d
LEFT JOIN latest_attempt l ON l.grp = d.grp
WHERE l.grp IS NULL OR d.attempt = l.attempt OR (d.attempt IS NULL AND d.start_ns >= l.first_start)
