-- silent_rollouts: one row per rollout whose spans the pipeline could not turn into training
-- signal: silence = 'no_calls' (spans, but no span recognised as an LLM call) or 'no_reward'
-- (LLM calls, but no reward with a value). Their calls would otherwise train on
-- pipeline.missing_reward, or nothing at all, without a word.
-- Parameters: $run_id (NULL = production traces), $epoch (NULL = every epoch).
-- Reads: rollout_summary (sql/rollout_summary.sql, or the catalog view of the same name).
SELECT epoch, rollout_id, grp,
    CASE WHEN calls + judge_calls = 0 THEN 'no_calls' WHEN reward IS NULL THEN 'no_reward' END AS silence,
    spans, calls + judge_calls AS calls, missing_rewards,
    count(*) OVER () AS of_rollouts  -- every rollout of the (run, epoch), silent or not
FROM rollout_summary
WHERE run_id IS NOT DISTINCT FROM $run_id
  AND ($epoch IS NULL OR epoch = $epoch)
QUALIFY silence IS NOT NULL
ORDER BY epoch, grp
