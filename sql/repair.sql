-- repair: one row per span of one (run, epoch) -- or of the production traces when $run_id is
-- NULL -- de-duplicated on (trace_id, span_id), classified (agent, llm, tool, reward), with its
-- repaired parent, its original parent and the reason it moved.
--
-- A span moves when its parent is missing, does not enclose it in time, or sits in a parent
-- cycle; a root moves when another span of its rollout encloses it. It moves to the tightest
-- enclosing span of the same rollout (an agent span wins a tie), never to one of its original
-- descendants. Every edge goes from a span to one that precedes it in the order
-- (start asc, end desc, original depth asc, node), so the result has no cycle.
-- Parameters: $run_id, $epoch (NULL = every epoch of the run).
WITH RECURSIVE
selected AS NOT MATERIALIZED (
    SELECT run_id, epoch, rollout_id, task_id, attempt, trace_id, span_id, parent_id, name,
           start_ns, end_ns, status_code, attributes::VARCHAR AS attributes,
           events::VARCHAR AS events, received_ns
    FROM spans
    WHERE run_id IS NOT DISTINCT FROM $run_id
      AND ($epoch IS NULL OR epoch = $epoch)
),
duplicated AS (
    -- OTLP retries and compaction can store a span twice (rare): find those ids on narrow columns
    SELECT trace_id, span_id FROM selected GROUP BY trace_id, span_id HAVING count(*) > 1
),
deduped AS (
    SELECT s.* FROM selected s ANTI JOIN duplicated d USING (trace_id, span_id)
    UNION ALL
    (SELECT s.* FROM selected s SEMI JOIN duplicated d USING (trace_id, span_id)
     QUALIFY row_number() OVER (PARTITION BY trace_id, span_id ORDER BY received_ns DESC) = 1)
),
extracted AS (
    SELECT *, json_extract_string(attributes, [
        '$."arclight.span.kind"',                              -- 1
        '$."agent.name"',                                      -- 2
        '$."gen_ai.agent.name"',                               -- 3
        '$."recipient_agent_type"',                            -- 4
        '$."langchain.chain.type"',                            -- 5
        '$."agentops.span.kind"',                              -- 6
        '$."operation.name"',                                  -- 7
        '$."executor.id"',                                     -- 8
        '$."openinference.span.kind"',                         -- 9
        '$."metadata"',                                        -- 10
        '$."traceloop.association.properties.langgraph_node"', -- 11
        '$."gen_ai.operation.name"',                           -- 12
        '$."llm.request.type"',                                -- 13
        '$."arclight.reward.value"',                           -- 14
        '$."agentlightning.reward.0.value"',                   -- 15
        '$."arclight.rollout_id"',                             -- 16
        '$."arclight.task_id"',                                -- 17
        '$."arclight.attempt"',                                -- 18
        '$."traceloop.span.kind"',                             -- 19
        '$."arclight.rollout.status"'                          -- 20
    ]) AS a
    FROM deduped
),
classified AS (
    SELECT
        run_id, epoch,
        coalesce(rollout_id, a[16]) AS rollout_id,
        coalesce(task_id, a[17]) AS task_id,
        coalesce(attempt, TRY_CAST(a[18] AS BIGINT)) AS attempt,
        coalesce(rollout_id, a[16], trace_id) AS grp,
        trace_id, span_id, parent_id, name, start_ns, end_ns, status_code,
        a[1] = 'llm' OR a[12] IN ('chat', 'text_completion') OR a[9] = 'LLM'
            OR a[13] IN ('chat', 'completion') AS is_llm,
        a[1] = 'tool' OR a[12] = 'execute_tool' OR a[9] = 'TOOL' OR a[19] = 'tool'
            OR a[6] = 'tool' AS is_tool,
        a[1] = 'reward' OR json_exists(attributes, '$."agentlightning.reward.0.value"') AS is_reward,
        TRY_CAST(coalesce(a[14], a[15]) AS DOUBLE) AS reward_value,
        coalesce(a[2], a[3], CASE WHEN a[6] = 'agent' THEN a[7] END, a[4], a[8],
                 CASE WHEN json_valid(a[10]) THEN json_extract_string(a[10], '$.langgraph_node') END,
                 a[11], a[5], CASE WHEN a[9] = 'AGENT' THEN name END) AS agent_label,
        a[1] = 'rollout' AS is_rollout,
        a[20] AS rollout_status,
        contains(events, '"name":"exception"') AS has_exception,
        attributes
    FROM extracted
),
latest_attempt AS (
    -- a retried rollout trains on its last attempt only
    SELECT grp, max(attempt) AS attempt FROM classified GROUP BY grp
),
nodes AS MATERIALIZED (
    SELECT c.* EXCLUDE (is_llm, is_tool, is_reward, agent_label, attributes),
        coalesce(c.is_llm, false) AS is_llm,
        coalesce(c.is_tool, false) AND NOT coalesce(c.is_llm, false) AS is_tool,
        coalesce(c.is_reward, false) AS is_reward,
        c.agent_label IS NOT NULL
            AND NOT (coalesce(c.is_llm, false) OR coalesce(c.is_tool, false) OR coalesce(c.is_reward, false)) AS is_agent,
        c.agent_label,
        CASE WHEN c.is_llm THEN c.attributes END AS llm_attributes,
        row_number() OVER () AS node
    FROM classified c
    JOIN latest_attempt l ON l.grp = c.grp AND l.attempt IS NOT DISTINCT FROM c.attempt
),
linked AS (
    -- the original parent, when it exists in the same rollout
    SELECT n.* EXCLUDE (llm_attributes), p.node AS orig_parent,
           p.start_ns <= n.start_ns AND n.end_ns <= p.end_ns AS parent_encloses
    FROM nodes n
    LEFT JOIN nodes p ON p.trace_id = n.trace_id AND p.span_id = n.parent_id AND p.grp = n.grp
),
original_paths (node, path) AS (
    -- root-to-span path in the original tree; spans caught in a parent cycle get none
    SELECT node, [node] FROM linked WHERE orig_parent IS NULL
    UNION ALL
    SELECT c.node, list_append(p.path, c.node)
    FROM original_paths p JOIN linked c ON c.orig_parent = p.node
    WHERE len(p.path) < 1000
),
with_paths AS MATERIALIZED (
    SELECT l.*, o.path, len(o.path) AS depth,
        CASE
            WHEN l.parent_id IS NULL OR l.parent_id = '' THEN 'root'
            WHEN l.orig_parent IS NULL THEN 'missing_parent'
            WHEN o.path IS NULL THEN 'parent_cycle'
            WHEN NOT l.parent_encloses THEN 'outside_parent'
        END AS detach_reason
    FROM linked l LEFT JOIN original_paths o USING (node)
),
detached AS (
    SELECT * FROM with_paths WHERE detach_reason IS NOT NULL
),
enclosing_candidates AS (
    -- spans of the same rollout that enclose a detached span, precede it, and are not its descendants
    SELECT d.node, c.node AS candidate, c.end_ns - c.start_ns AS width, c.is_agent,
           c.start_ns AS c_start, c.depth AS c_depth
    FROM detached d
    JOIN with_paths c ON c.grp = d.grp
     AND c.start_ns <= d.start_ns AND d.end_ns <= c.end_ns AND c.node <> d.node
    WHERE (c.start_ns < d.start_ns OR c.end_ns > d.end_ns
           OR (coalesce(c.depth, 1000000), c.node) < (coalesce(d.depth, 1000000), d.node))
      AND coalesce(NOT list_contains(c.path, d.node), false)
),
tightest_parent AS (
    SELECT node, candidate FROM enclosing_candidates
    QUALIFY row_number() OVER (PARTITION BY node
        ORDER BY width, is_agent DESC, c_start DESC, c_depth DESC NULLS LAST, candidate DESC) = 1
),
skipped_agent AS (
    -- an LLM span hung on a non-agent span (often the root) while an agent span inside that
    -- parent encloses it: the instrumentation lost the agent's context, time recovers it
    SELECT s.node, a.node AS candidate
    FROM with_paths s
    JOIN with_paths p ON p.node = s.orig_parent AND NOT p.is_agent AND NOT p.is_llm
    JOIN with_paths a ON a.grp = s.grp AND a.is_agent
     AND a.start_ns <= s.start_ns AND s.end_ns <= a.end_ns
     AND a.end_ns - a.start_ns < p.end_ns - p.start_ns
    WHERE s.is_llm AND s.detach_reason IS NULL
      AND list_contains(a.path, p.node) AND NOT list_contains(a.path, s.node)
      AND (a.start_ns < s.start_ns OR a.end_ns > s.end_ns OR (a.depth, a.node) < (s.depth, s.node))
    QUALIFY row_number() OVER (PARTITION BY s.node ORDER BY a.end_ns - a.start_ns, a.start_ns DESC, a.node DESC) = 1
)
SELECT
    w.run_id, w.epoch, w.rollout_id, w.task_id, w.attempt, w.grp, w.node,
    w.trace_id, w.span_id, w.name, w.start_ns, w.end_ns, w.status_code,
    coalesce(sa.candidate, tp.candidate, CASE WHEN w.detach_reason IS NULL THEN w.orig_parent END) AS parent_node,
    np.trace_id AS parent_trace_id,
    np.span_id AS parent_span_id,
    w.parent_id AS original_parent_id,
    CASE WHEN sa.candidate IS NOT NULL THEN 'agent_skipped'
         WHEN tp.candidate IS NOT NULL AND w.detach_reason = 'root' THEN 'enclosed_root'
         WHEN tp.candidate IS NOT NULL THEN w.detach_reason
         WHEN w.detach_reason IN ('missing_parent', 'parent_cycle', 'outside_parent') THEN w.detach_reason || '_no_enclosing_span'
    END AS repair_reason,
    w.is_llm, w.is_tool, w.is_reward, w.is_agent, w.is_rollout, w.agent_label,
    w.reward_value, w.rollout_status, w.has_exception, payload.llm_attributes
FROM with_paths w
JOIN nodes payload ON payload.node = w.node
LEFT JOIN tightest_parent tp ON tp.node = w.node
LEFT JOIN skipped_agent sa ON sa.node = w.node
LEFT JOIN nodes np ON np.node = coalesce(sa.candidate, tp.candidate, CASE WHEN w.detach_reason IS NULL THEN w.orig_parent END)
