-- trace_rollouts: one row per rollout of one (run, epoch) -- per trace of the production traces
-- when $run_id is NULL -- as an MLflow trace shows it (lightning_core/epoch/traces.py): what its
-- spans say (sql/rollout_summary.sql: status, final reward, calls, tokens, agents, flags), what
-- the flow recorded of it (the state table rollouts: task, group, attempt, status, error and whose
-- failure it was), and the policy versions that answered its calls. A rollout that ran and left no
-- span is a row too: its trace says how it ended. Planned rollouts that never ran are not.
-- Parameters: $run_id, $epoch. Reads: rollout_summary, llm_calls, rollouts (state table).
WITH
ran AS (
    SELECT * FROM rollouts
    WHERE run_id = $run_id AND ($epoch IS NULL OR epoch = $epoch) AND status NOT IN ('planned', 'running')
),
versions AS (
    SELECT grp, list(DISTINCT policy_version ORDER BY policy_version) FILTER (WHERE policy_version IS NOT NULL) AS versions
    FROM llm_calls GROUP BY grp
)
SELECT coalesce(s.grp, r.rollout_id) AS grp,
    coalesce(s.rollout_id, r.rollout_id, s.grp) AS rollout_id,  -- a production trace's: its trace id
    coalesce(s.task_id, r.task_id) AS task_id,
    coalesce(r.attempt, s.attempt) AS attempt, r.group_id, r.sample_index, r.mode, r.task,
    coalesce(r.status, s.status) AS status, s.status AS span_status, r.error, r.error_kind,
    coalesce(s.reward, r.reward) AS reward, s.calls, s.judge_calls, s.prompt_tokens::BIGINT AS prompt_tokens,
    s.response_tokens::BIGINT AS response_tokens, coalesce(s.agents, []) AS agents, s.spans, s.repaired_spans,
    s.tool_failures, coalesce(s.flags, []) AS flags, coalesce(v.versions, []) AS versions,
    coalesce(s.start_ns, epoch_ns(r.started_at)) AS start_ns, coalesce(s.end_ns, epoch_ns(r.finished_at)) AS end_ns
FROM rollout_summary s
FULL JOIN ran r ON r.rollout_id = s.rollout_id
LEFT JOIN versions v ON v.grp = s.grp
