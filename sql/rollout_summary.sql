-- rollout_summary: one row per rollout (per trace for production spans): status, final reward,
-- calls, tool calls (tool spans outside reward functions), tokens, duration, agents, span coverage
-- (share of spans owned by an agent), repairs and flags. Independent of any policy's agent selection.
-- Reads: span_owners (sql/span_owners.sql), calls, rewards.
WITH
span_stats AS (
    SELECT grp, any_value(run_id) AS run_id, any_value(epoch) AS epoch,
        any_value(rollout_id) AS rollout_id, any_value(task_id) AS task_id, max(attempt) AS attempt,
        max(rollout_status) AS reported_status,
        count(*) AS spans,
        count(*) FILTER (WHERE repair_reason IS NOT NULL AND parent_node IS NOT NULL) AS repaired_spans,
        count(*) FILTER (WHERE agent_name IS NOT NULL) / count(*) AS span_coverage,
        count(*) FILTER (WHERE status_code = 'ERROR') AS error_spans,
        count(*) FILTER (WHERE is_tool AND NOT in_reward) AS tool_calls,
        min(start_ns) AS start_ns, max(end_ns) AS end_ns
    FROM span_owners GROUP BY grp
),
call_stats AS (
    SELECT grp,
        count(*) FILTER (WHERE NOT in_reward) AS calls,
        count(*) FILTER (WHERE in_reward) AS judge_calls,
        count(*) FILTER (WHERE list_contains(flags, 'missing_token_ids')) AS calls_missing_token_ids,
        sum(coalesce(prompt_tokens, usage_input_tokens)) AS prompt_tokens,
        sum(coalesce(response_tokens, usage_output_tokens)) AS response_tokens,
        list(DISTINCT agent_name ORDER BY agent_name) FILTER (WHERE agent_name IS NOT NULL) AS agents
    FROM calls GROUP BY grp
),
reward_stats AS (
    SELECT grp,
        arg_max(value, start_ns) FILTER (WHERE kind = 'reward' AND value IS NOT NULL) AS reward,
        count(*) FILTER (WHERE kind = 'reward' AND value IS NOT NULL) AS rewards,
        count(*) FILTER (WHERE kind = 'reward' AND value IS NULL) AS missing_rewards,
        count(*) FILTER (WHERE kind = 'tool_failure') AS tool_failures
    FROM rewards GROUP BY grp
)
SELECT s.run_id, s.epoch, s.rollout_id, s.task_id, s.attempt,
    coalesce(s.reported_status, CASE WHEN s.error_spans > 0 THEN 'errors' ELSE 'ok' END) AS status,
    r.reward, coalesce(r.rewards, 0) AS rewards, coalesce(r.missing_rewards, 0) AS missing_rewards,
    coalesce(c.calls, 0) AS calls, coalesce(c.judge_calls, 0) AS judge_calls,
    coalesce(c.prompt_tokens, 0) AS prompt_tokens, coalesce(c.response_tokens, 0) AS response_tokens,
    (s.end_ns - s.start_ns) / 1e6 AS duration_ms,
    coalesce(c.agents, []) AS agents,
    s.spans, s.repaired_spans, s.span_coverage, s.error_spans, coalesce(r.tool_failures, 0) AS tool_failures,
    s.tool_calls,
    list_filter([
        CASE WHEN r.reward IS NULL THEN 'no_reward' END,
        CASE WHEN coalesce(c.calls_missing_token_ids, 0) > 0 THEN 'missing_token_ids' END,
        CASE WHEN s.repaired_spans > 0 THEN 'repaired' END,
        CASE WHEN s.error_spans > 0 THEN 'errors' END,
        CASE WHEN coalesce(c.calls, 0) = 0 THEN 'no_calls' END
    ], lambda x: x IS NOT NULL) AS flags,
    s.start_ns, s.end_ns, s.grp
FROM span_stats s
LEFT JOIN call_stats c USING (grp)
LEFT JOIN reward_stats r USING (grp)
