-- epoch_signals: what shows a collapse before the score falls. One row per (run, epoch, policy,
-- slice): slice 'all' holds every rollout with a triplet of the policy; with $by (a task field,
-- rollouts.metrics_by) each value of that field in the rollouts' tasks has a slice of its own,
-- '<field>=<value>' ('<field>=none' for tasks without it), so one kind of task is seen apart from
-- the others. R is a rollout's return, as the advantages take it (triplets.rollout_return).
--   zero_variance_groups: the share of groups (tasks) whose rollouts all got the same R (a group of
--     one rollout too): the groups that train nothing;
--   reward_spread: the mean over groups of the population standard deviation of R within the group
--     (0 for an all-equal group);
--   reward_mean: the mean R per rollout;
--   tool_calls_per_rollout: the mean tool spans per rollout (rollout_summary.tool_calls).
-- Parameters: $run_id, $epoch (NULL = every epoch of the run), $policy (NULL = every policy),
-- $by (NULL = the 'all' slice only).
-- Reads: triplets, rollout_summary, rollouts (the state table: the task each rollout ran).
WITH
rollout_returns AS (
    SELECT run_id, epoch, policy, group_id, rollout_id, any_value(rollout_return) AS R
    FROM triplets
    WHERE run_id = $run_id AND ($epoch IS NULL OR epoch = $epoch) AND ($policy IS NULL OR policy = $policy)
    GROUP BY run_id, epoch, policy, group_id, rollout_id
),
rollout_rows AS (
    SELECT t.*, coalesce(s.tool_calls, 0) AS tool_calls,
        $by || '=' || coalesce(json_extract_string(r.task, '$."' || $by || '"'), 'none') AS task_value
    FROM rollout_returns t
    LEFT JOIN rollout_summary s ON s.run_id = t.run_id AND s.epoch = t.epoch AND s.rollout_id = t.rollout_id
    LEFT JOIN rollouts r ON r.rollout_id = t.rollout_id
),
sliced AS (
    -- every rollout counts in 'all' and, with $by, in its task's value
    SELECT * EXCLUDE (task_value), unnest(list_filter(['all', task_value], lambda s: s IS NOT NULL)) AS slice
    FROM rollout_rows
),
group_returns AS (
    SELECT run_id, epoch, policy, slice, group_id, max(R) = min(R) AS all_equal, stddev_pop(R) AS spread
    FROM sliced GROUP BY run_id, epoch, policy, slice, group_id
),
group_stats AS (
    SELECT run_id, epoch, policy, slice, count(*) AS groups,
        avg(all_equal::DOUBLE) AS zero_variance_groups, avg(spread) AS reward_spread
    FROM group_returns GROUP BY run_id, epoch, policy, slice
),
rollout_stats AS (
    SELECT run_id, epoch, policy, slice, count(*) AS rollouts, avg(R) AS reward_mean,
        avg(tool_calls) AS tool_calls_per_rollout
    FROM sliced GROUP BY run_id, epoch, policy, slice
)
SELECT r.run_id, r.epoch, r.policy, r.slice, r.rollouts, g.groups, g.zero_variance_groups, g.reward_spread,
    r.reward_mean, r.tool_calls_per_rollout
FROM rollout_stats r
JOIN group_stats g USING (run_id, epoch, policy, slice)
ORDER BY r.run_id, r.epoch, r.policy, r.slice <> 'all', r.slice
