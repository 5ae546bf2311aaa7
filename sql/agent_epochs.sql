-- agent_epochs: one row per (epoch, agent) of the pipeline run: the agent's model calls (outside
-- reward functions), the rollouts it took part in, and the mean final reward and success rate of
-- those rollouts -- each rollout counted once per agent, however many calls it made. Which policy
-- trains the agent and its triplet count are added by the caller (they depend on the config).
-- Calls owned by no agent are grouped under agent_name NULL.
-- Reads: calls (sql/calls.sql), rollout_summary (sql/rollout_summary.sql).
-- Parameters: $success_reward (a rollout succeeded when its reward >= this).
WITH taking_part AS (
    SELECT epoch, agent_name, grp, count(*) AS calls
    FROM calls
    WHERE NOT in_reward
    GROUP BY ALL
)
SELECT t.epoch, t.agent_name,
    sum(t.calls)::BIGINT AS calls,
    count(*) AS rollouts,
    avg(s.reward) AS reward_mean,
    avg(CASE WHEN s.reward >= $success_reward THEN 1.0 ELSE 0.0 END) FILTER (WHERE s.reward IS NOT NULL) AS success_rate
FROM taking_part t
LEFT JOIN rollout_summary s USING (grp)
GROUP BY ALL
ORDER BY t.epoch, t.agent_name NULLS LAST
