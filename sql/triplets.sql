-- triplets: one row per selected model call, in time order per rollout (turn_index from 0):
-- the reward and the rollout's return (token ids and messages are joined in advantages.sql).
-- Calls without token ids are dropped when $missing_token_ids = 'drop' (else kept, flagged).
-- group_id is the GRPO group: the task (a rollout with no task is its own group).
-- Reads: credit (sql/credit.sql).
WITH
kept AS (
    SELECT * FROM credit
    WHERE NOT ($missing_token_ids = 'drop' AND list_contains(flags, 'missing_token_ids'))
)
SELECT
    run_id, epoch, $policy::VARCHAR AS policy, rollout_id, task_id,
    coalesce(task_id, rollout_id, grp) AS group_id, attempt, agent_name,
    (row_number() OVER (PARTITION BY grp ORDER BY start_ns, node) - 1)::BIGINT AS turn_index,
    trace_id, span_id, start_ns, end_ns,
    reward, rollout_return, response_id, grp, call_key, flags
FROM kept
