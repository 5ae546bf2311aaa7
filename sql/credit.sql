-- credit: one row per selected call -- its owning agent matches $agent_match (search
-- semantics; NULL = every agent; a call no agent span owns matches as the empty name, so '.*'
-- and '^$' select it and '^calc$' does not) and it is not inside a reward function unless
-- $exclude_llm_call_in_reward is false -- with the reward that $reward_policy assigns it and the
-- return R of its rollout:
--   final                   every call gets the rollout's last reward (R = that reward)
--   first_occurrence        a call gets the first reward that starts after it ends (R = sum of rewards)
--   latest_unrewarded_call  rewards in time order; each goes to at most one call: the latest-starting
--                           call that ended before the reward started and has no reward yet (Agent
--                           Lightning's first_occurrence); a reward with no such call is unused
--                           (R = sum of rewards)
--   first_sibling           a reward goes to the nearest earlier call under the same parent span;
--                           the first such reward wins (R = sum of rewards)
--   discounted              the last reward * $gamma ^ (selected calls after this one) (R = last reward)
-- Failed tool calls charged to a call add their (negative) value to its reward and to R.
-- step_reward (read by sql/advantages.sql when $advantage = 'turn'): what the spans say of this call
-- alone -- its tool rewards (kind tool_reward) and failure penalties, plus, under the per-call
-- policies (first_occurrence, latest_unrewarded_call, first_sibling), its matched reward. Under
-- final/discounted the outcome is not repeated in it, and a call that caused no tool outcome has
-- step_reward 0: it changed nothing it could be scored on (MT-GRPO's turn reward for a turn without a
-- tool call). Under a per-call policy a call that none of these reach has step_reward NULL: its
-- reward is unknown (flag no_reward), and it sits out of its turn's comparison.
-- A call that no reward reaches has reward NULL and the flag no_reward -- never a made-up 0 (a
-- penalised one: $missing_reward + penalty) -- and a rollout with no reward has R = $missing_reward.
-- Rewards count when their emitting agent matches $reward_agent_match (NULL = all), whichever
-- agent's calls are selected, so a critic can give rewards without training.
-- Only narrow columns travel through here; advantages.sql joins the token ids back.
-- Reads: calls (sql/calls.sql), rewards.
WITH RECURSIVE
selected_calls AS (
    SELECT run_id, epoch, rollout_id, task_id, attempt, grp, call_key, node, trace_id, span_id,
        parent_node, start_ns, end_ns, agent_name, response_id, flags,
        row_number() OVER (PARTITION BY grp ORDER BY start_ns, node) AS turn,
        count(*) OVER (PARTITION BY grp) AS turns
    FROM calls
    WHERE NOT (in_reward AND $exclude_llm_call_in_reward)
      AND ($agent_match IS NULL OR regexp_matches(coalesce(agent_name, ''), $agent_match))
),
counted_rewards AS (
    SELECT * FROM rewards
    WHERE kind = 'reward' AND value IS NOT NULL
      AND ($reward_agent_match IS NULL OR regexp_matches(coalesce(agent_name, ''), $reward_agent_match))
),
rollout_rewards AS (
    SELECT grp, arg_max(value, start_ns) AS final_value, sum(value) AS total_value, count(*) AS reward_count
    FROM counted_rewards GROUP BY grp
),
first_occurrence AS (
    -- (each policy's matching runs only when it is the chosen policy)
    SELECT c.call_key, c.grp, r.value
    FROM selected_calls c
    ASOF JOIN counted_rewards r ON c.grp = r.grp AND c.end_ns <= r.start_ns
    WHERE $reward_policy = 'first_occurrence'
),
unrewarded_events AS (
    -- calls and rewards of each rollout in start order (a call before a reward that starts with it)
    SELECT grp, row_number() OVER (PARTITION BY grp ORDER BY start_ns, is_reward, call_key, value) AS step,
        call_key, start_ns, end_ns, value, is_reward
    FROM (SELECT grp, call_key, start_ns, end_ns, NULL::DOUBLE AS value, false AS is_reward FROM selected_calls
          WHERE $reward_policy = 'latest_unrewarded_call'
          UNION ALL
          SELECT grp, NULL, start_ns, end_ns, value, true FROM counted_rewards
          WHERE $reward_policy = 'latest_unrewarded_call')
),
unrewarded_walk (grp, step, waiting, call_key, value) AS (
    -- one event per rollout at a time; waiting holds the calls seen and not yet rewarded, in start
    -- order; a reward takes the last of them that ended by the reward's start
    SELECT grp, 0, []::STRUCT(call_key VARCHAR, end_ns BIGINT)[], NULL::VARCHAR, NULL::DOUBLE
    FROM (SELECT DISTINCT grp FROM unrewarded_events)
    UNION ALL
    SELECT w.grp, e.step,
        CASE WHEN NOT e.is_reward THEN list_append(w.waiting, {'call_key': e.call_key, 'end_ns': e.end_ns})
             ELSE list_filter(w.waiting, lambda c: c.call_key IS DISTINCT FROM
                 list_last(list_filter(w.waiting, lambda x: x.end_ns <= e.start_ns)).call_key) END,
        CASE WHEN e.is_reward THEN list_last(list_filter(w.waiting, lambda x: x.end_ns <= e.start_ns)).call_key END,
        CASE WHEN e.is_reward THEN e.value END
    FROM unrewarded_walk w JOIN unrewarded_events e ON e.grp = w.grp AND e.step = w.step + 1
),
latest_unrewarded_call AS (
    SELECT grp, call_key, value FROM unrewarded_walk WHERE call_key IS NOT NULL
),
sibling_events AS (
    SELECT grp, parent_node, start_ns, 0 AS ord, call_key, NULL::DOUBLE AS value FROM selected_calls
    WHERE $reward_policy = 'first_sibling'
    UNION ALL
    SELECT grp, parent_node, start_ns, 1 AS ord, NULL AS call_key, value FROM counted_rewards
    WHERE $reward_policy = 'first_sibling'
),
preceding_sibling AS (
    SELECT *, last_value(call_key IGNORE NULLS) OVER (
        PARTITION BY grp, parent_node ORDER BY start_ns, ord ROWS UNBOUNDED PRECEDING) AS prev_call
    FROM sibling_events
),
first_sibling AS (
    SELECT grp, prev_call AS call_key, first(value ORDER BY start_ns) AS value
    FROM preceding_sibling
    WHERE call_key IS NULL AND prev_call IS NOT NULL
    GROUP BY grp, prev_call
),
penalties AS (
    SELECT grp, caused_by_call AS call_key, sum(value) AS penalty, count(*) AS failures
    FROM rewards WHERE kind = 'tool_failure' AND caused_by_call IS NOT NULL AND value <> 0
    GROUP BY grp, caused_by_call
),
tool_rewards AS (
    SELECT grp, caused_by_call AS call_key, sum(value) AS tool_reward
    FROM rewards WHERE kind = 'tool_reward' AND caused_by_call IS NOT NULL
    GROUP BY grp, caused_by_call
),
matched AS (
    SELECT c.*,
        CASE $reward_policy
            WHEN 'final' THEN rr.final_value
            WHEN 'discounted' THEN rr.final_value * pow($gamma::DOUBLE, c.turns - c.turn)
            WHEN 'first_occurrence' THEN fo.value
            WHEN 'latest_unrewarded_call' THEN lu.value
            WHEN 'first_sibling' THEN fs.value
        END AS matched_reward,
        CASE WHEN $reward_policy IN ('final', 'discounted') THEN rr.final_value ELSE rr.total_value END AS rollout_reward,
        coalesce(p.penalty, 0.0) AS penalty,
        coalesce(p.failures, 0) AS failures,
        tr.tool_reward
    FROM selected_calls c
    LEFT JOIN rollout_rewards rr ON rr.grp = c.grp
    LEFT JOIN first_occurrence fo ON fo.grp = c.grp AND fo.call_key = c.call_key
    LEFT JOIN latest_unrewarded_call lu ON lu.grp = c.grp AND lu.call_key = c.call_key
    LEFT JOIN first_sibling fs ON fs.grp = c.grp AND fs.call_key = c.call_key
    LEFT JOIN penalties p ON p.grp = c.grp AND p.call_key = c.call_key
    LEFT JOIN tool_rewards tr ON tr.grp = c.grp AND tr.call_key = c.call_key
)
SELECT m.* EXCLUDE (matched_reward, rollout_reward, flags, tool_reward),
    -- no matched reward: NULL (flagged no_reward), so no mean counts it as a real value; a
    -- penalty still lands on the call, on top of $missing_reward
    CASE WHEN m.matched_reward IS NOT NULL OR m.failures > 0
         THEN coalesce(m.matched_reward, $missing_reward::DOUBLE) + m.penalty END AS reward,
    coalesce(m.rollout_reward, $missing_reward::DOUBLE)
        + sum(m.penalty) OVER (PARTITION BY m.grp) AS rollout_return,
    CASE WHEN $reward_policy IN ('final', 'discounted') THEN coalesce(m.tool_reward, 0.0) + m.penalty
         WHEN m.matched_reward IS NOT NULL OR m.tool_reward IS NOT NULL OR m.failures > 0
         THEN coalesce(m.matched_reward, 0.0) + coalesce(m.tool_reward, 0.0) + m.penalty END AS step_reward,
    list_filter(m.flags || [
        CASE WHEN m.matched_reward IS NULL THEN 'no_reward' END,
        CASE WHEN m.failures > 0 THEN 'tool_failure' END
    ], lambda x: x IS NOT NULL) AS flags
FROM matched m
