-- advantages: the triplets with their GRPO advantage. R (the rollout's return) is taken once per
-- rollout; each group (task) gets mean and sample std of R over its rollouts; a rollout's
-- advantage R - mean, divided by (std + 1e-4) when $normalize_std, goes to all its calls.
-- Groups whose returns are all equal (or that hold one rollout) get advantage 0 and the flag
-- 'zero_advantage_group': they train nothing.
-- Reads: triplet_rows (sql/triplets.sql), llm_calls (token ids, messages).
WITH
rollout_returns AS (
    SELECT group_id, grp, any_value(rollout_return) AS R FROM triplet_rows GROUP BY group_id, grp
),
group_stats AS (
    SELECT group_id, avg(R) AS mean_R, coalesce(stddev_samp(R), 0.0) AS std_R,
           count(*) AS rollouts, max(R) - min(R) = 0 AS all_equal
    FROM rollout_returns GROUP BY group_id
),
rollout_advantages AS (
    SELECT r.grp, g.all_equal,
        CASE WHEN g.all_equal THEN 0.0
             WHEN $normalize_std THEN (r.R - g.mean_R) / (g.std_R + 1e-4)
             ELSE r.R - g.mean_R END AS advantage
    FROM rollout_returns r JOIN group_stats g USING (group_id)
)
SELECT
    t.run_id, t.epoch, t.policy, t.rollout_id, t.task_id, t.group_id, t.attempt, t.agent_name,
    t.turn_index, t.trace_id, t.span_id, t.start_ns,
    c.prompt_token_ids, c.response_token_ids, c.response_logprobs,
    c.prompt_messages, c.response_text,
    t.reward, a.advantage, c.policy_version, c.model,
    CASE WHEN a.all_equal THEN list_append(t.flags, 'zero_advantage_group') ELSE t.flags END AS flags,
    t.rollout_return, t.end_ns, t.response_id
FROM triplet_rows t
JOIN rollout_advantages a USING (grp)
JOIN llm_calls c ON c.grp = t.grp AND c.call_key = t.call_key
ORDER BY t.group_id, t.rollout_id, t.turn_index
