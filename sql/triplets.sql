-- triplets: one row per selected model call, in time order per rollout (turn_index from 0):
-- the reward, the rollout's return and the call's step reward (token ids and messages are joined in
-- advantages.sql).
-- Calls without token ids are dropped when $missing_token_ids = 'drop' (else kept, flagged).
-- group_id is the GRPO group: the task (a rollout with no task is its own group).
-- Infrastructure failures are never training data: a rollout that our services failed (the state table's
-- rollouts.error_kind = 'infrastructure': the gateway or vLLM down or answering 5xx, spans the collector never
-- stored) ran again until it finished or its retries ran out; a group in which one is still failed is left out
-- whole, since a group scored on the members the infrastructure happened to leave would skew its advantages.
-- The agent's own failures (an exception, a timeout, a wrong answer) train as they are.
-- Reads: credit (sql/credit.sql), rollouts (the state table; empty for spans of agents Arclight did not run).
WITH
kept AS (
    SELECT * FROM credit
    WHERE NOT ($missing_token_ids = 'drop' AND list_contains(flags, 'missing_token_ids'))
),
infrastructure_failed AS (
    SELECT DISTINCT f.run_id, f.epoch, f.group_id
    FROM rollouts f
    WHERE f.error_kind = 'infrastructure' AND f.status IN ('failed', 'timed_out')
),
trainable AS (
    SELECT k.* FROM kept k
    LEFT JOIN rollouts r ON r.rollout_id = k.rollout_id
    ANTI JOIN infrastructure_failed f ON f.run_id = r.run_id AND f.epoch = r.epoch AND f.group_id = r.group_id
)
SELECT
    run_id, epoch, $policy::VARCHAR AS policy, rollout_id, task_id,
    coalesce(task_id, rollout_id, grp) AS group_id, attempt, agent_name,
    (row_number() OVER (PARTITION BY grp ORDER BY start_ns, node) - 1)::BIGINT AS turn_index,
    trace_id, span_id, start_ns, end_ns,
    reward, rollout_return, step_reward, response_id, grp, call_key, flags
FROM trainable
