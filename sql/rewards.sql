-- rewards: one row per reward signal of a rollout. kind = 'reward': a reward span (emit_reward,
-- or Agent Lightning's agentlightning.reward.0.value), value NULL when the reward was None or not
-- a number. kind = 'tool_failure': a failed tool call or an exception span, value
-- -$tool_failure_penalty, charged to the call that caused it (caused_by_call: the latest call of
-- the same agent -- else of the rollout -- that ended before the failure started). kind = 'tool_reward':
-- a tool span's own reward (arclight.tool.reward, e.g. a search's information gain), charged to the
-- call that caused the tool call in the same way; sql/credit.sql counts it in that call's step_reward
-- only (pipeline.advantage = turn), never in its reward or the rollout's return.
-- Reads: span_owners (sql/span_owners.sql), span_nodes, calls (sql/calls.sql).
WITH
flagged AS MATERIALIZED (
    -- the few spans that can be reward signals, picked out before their owners are joined
    SELECT s.* FROM span_owners s
    SEMI JOIN (SELECT node FROM span_nodes
               WHERE is_reward OR (is_tool AND (status_code = 'ERROR' OR tool_reward IS NOT NULL)) OR has_exception) f
    USING (node)
),
reward_spans AS (
    SELECT run_id, epoch, rollout_id, task_id, grp, node, trace_id, span_id, name, start_ns, end_ns,
           parent_node, agent_name, in_reward, 'reward' AS kind, reward_value AS value,
           NULL::VARCHAR AS caused_by_call
    FROM flagged
    WHERE is_reward
),
failed_spans AS (
    SELECT * FROM flagged
    WHERE (is_tool AND status_code = 'ERROR')
       OR (has_exception AND NOT (is_agent OR is_llm OR is_reward OR is_tool OR is_rollout OR in_reward))
),
innermost_failures AS (
    -- an exception inside a failed tool call is the same failure: count the tool call once
    SELECT f.* FROM failed_spans f
    LEFT JOIN failed_spans p ON p.node = f.parent_node AND p.is_tool
    WHERE p.node IS NULL AND NOT f.in_reward
),
rewarded_tools AS (
    SELECT * FROM flagged WHERE is_tool AND tool_reward IS NOT NULL AND NOT in_reward
),
charged AS (
    -- the spans charged to the call that caused them (a failed tool call with a reward is one span)
    SELECT node, grp, agent_name, start_ns FROM innermost_failures
    UNION
    SELECT node, grp, agent_name, start_ns FROM rewarded_tools
),
policy_calls AS (
    SELECT grp, coalesce(agent_name, '') AS agent_key, end_ns, call_key FROM calls WHERE NOT in_reward
),
caused_by_same_agent AS (
    SELECT f.node, c.call_key
    FROM charged f
    ASOF JOIN policy_calls c ON f.grp = c.grp AND coalesce(f.agent_name, '') = c.agent_key AND f.start_ns >= c.end_ns
),
caused_by_any AS (
    SELECT f.node, c.call_key
    FROM charged f
    ASOF JOIN policy_calls c ON f.grp = c.grp AND f.start_ns >= c.end_ns
),
failure_rows AS (
    SELECT f.run_id, f.epoch, f.rollout_id, f.task_id, f.grp, f.node, f.trace_id, f.span_id, f.name,
           f.start_ns, f.end_ns, f.parent_node, f.agent_name, f.in_reward, 'tool_failure' AS kind,
           -$tool_failure_penalty::DOUBLE AS value,
           coalesce(s.call_key, a.call_key) AS caused_by_call
    FROM innermost_failures f
    LEFT JOIN caused_by_same_agent s USING (node)
    LEFT JOIN caused_by_any a USING (node)
),
tool_reward_rows AS (
    SELECT f.run_id, f.epoch, f.rollout_id, f.task_id, f.grp, f.node, f.trace_id, f.span_id, f.name,
           f.start_ns, f.end_ns, f.parent_node, f.agent_name, f.in_reward, 'tool_reward' AS kind,
           f.tool_reward AS value,
           coalesce(s.call_key, a.call_key) AS caused_by_call
    FROM rewarded_tools f
    LEFT JOIN caused_by_same_agent s USING (node)
    LEFT JOIN caused_by_any a USING (node)
)
SELECT * FROM reward_spans
UNION ALL BY NAME
SELECT * FROM failure_rows
UNION ALL BY NAME
SELECT * FROM tool_reward_rows
