-- advantages: the triplets with their GRPO advantage. R (the rollout's return) is taken once per
-- rollout; each group (task) gets mean and sample std of R over its rollouts; a rollout's
-- advantage R - mean, divided by (std + 1e-4) when $normalize_std, goes to all its calls.
-- That is rollout_advantage, and with $advantage = 'rollout' (the default) it is the advantage.
-- With $advantage = 'turn' (MT-GRPO, arXiv 2505.11821) a call's advantage is
--     advantage = rollout_advantage + $turn_advantage_weight * turn_advantage
--     turn_advantage = (s - mean s) / (std s + 1e-4)   (s - mean s without $normalize_std)
-- where s is the call's step_reward (sql/credit.sql) and mean and sample std are taken over the
-- comparable calls: those of the same group with the same turn_index and a step reward (not NULL).
-- A call with no step reward, or whose comparable set has fewer than 2 calls or all-equal s, gets
-- turn_advantage 0; under 'rollout' turn_advantage is NULL (not computed).
-- Groups whose returns are all equal (or that hold one rollout) get rollout_advantage 0; when every
-- call's advantage in such a group is then 0 it is flagged 'zero_advantage_group': it trains nothing
-- (under 'turn' a group of equal returns whose step rewards differ is not flagged: it trains).
-- The wide fields (token ids, logprobs, messages, text) are joined last, from the spans that
-- sql/calls.sql chose for them, with the narrow rows as the hash join's build side: the wide rows
-- stream through one join and one sort, on one integer (the row's place, numbered on the narrow
-- rows: sorting wide rows on the string keys costs DuckDB about twice the time and memory).
-- (sql/llm_calls.sql does the same join for all calls.)
-- Reads: triplet_rows (sql/triplets.sql), calls (sql/calls.sql), llm_spans (sql/llm_spans.sql).
-- Parameters: $normalize_std, $advantage ('rollout' | 'turn'), $turn_advantage_weight.
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
),
step_stats AS (
    SELECT group_id, turn_index, avg(step_reward) AS mean_s, coalesce(stddev_samp(step_reward), 0.0) AS std_s,
           count(step_reward) AS comparable, max(step_reward) - min(step_reward) = 0 AS all_equal_s
    FROM triplet_rows WHERE $advantage = 'turn' GROUP BY group_id, turn_index
),
turn_advantages AS (
    SELECT t.grp, t.call_key, t.group_id,
        CASE WHEN t.step_reward IS NULL OR s.comparable < 2 OR s.all_equal_s THEN 0.0
             WHEN $normalize_std THEN (t.step_reward - s.mean_s) / (s.std_s + 1e-4)
             ELSE t.step_reward - s.mean_s END AS turn_advantage
    FROM triplet_rows t JOIN step_stats s USING (group_id, turn_index)
),
flat_groups AS (
    -- the groups whose calls all get advantage 0: all-equal returns, and no call's weighted turn term
    SELECT g.group_id FROM group_stats g
    WHERE g.all_equal AND NOT EXISTS (SELECT 1 FROM turn_advantages t
                                      WHERE t.group_id = g.group_id AND $turn_advantage_weight * t.turn_advantage <> 0)
),
narrow AS MATERIALIZED (
    SELECT
        -- the output order: by group, rollout, turn (grp tells apart traces with no rollout id)
        row_number() OVER (ORDER BY t.group_id, t.rollout_id, t.grp, t.turn_index) AS place,
        t.run_id, t.epoch, t.policy, t.rollout_id, t.task_id, t.group_id, t.attempt, t.agent_name,
        t.turn_index, t.trace_id, t.span_id, t.start_ns,
        t.reward,
        CASE WHEN $advantage = 'turn' THEN a.advantage + $turn_advantage_weight * ta.turn_advantage
             ELSE a.advantage END AS advantage,
        c.policy_version, c.model,
        CASE WHEN f.group_id IS NOT NULL THEN list_append(t.flags, 'zero_advantage_group') ELSE t.flags END AS flags,
        t.rollout_return, t.end_ns, t.response_id, a.advantage AS rollout_advantage, ta.turn_advantage,
        c.tokens_node, c.prompt_ids_node, c.logprobs_node, c.messages_node, c.text_node, c.single_source
    FROM triplet_rows t
    JOIN rollout_advantages a USING (grp)
    LEFT JOIN turn_advantages ta ON ta.grp = t.grp AND ta.call_key = t.call_key
    LEFT JOIN flat_groups f ON f.group_id = t.group_id
    JOIN calls c ON c.grp = t.grp AND c.call_key = t.call_key
),
mixed_nodes AS (
    -- the spans that calls with fields from several spans need (few, often none)
    SELECT s.node, s.prompt_token_ids, s.response_token_ids, s.response_logprobs, s.prompt_messages, s.response_text
    FROM llm_spans s
    SEMI JOIN (SELECT unnest([tokens_node, prompt_ids_node, logprobs_node, messages_node, text_node]) AS node
               FROM narrow WHERE NOT single_source) m USING (node)
),
wide AS (
    SELECT n.* EXCLUDE (tokens_node, prompt_ids_node, logprobs_node, messages_node, text_node, single_source),
        g.prompt_token_ids, g.response_token_ids, g.response_logprobs, g.prompt_messages, g.response_text
    FROM llm_spans g
    RIGHT JOIN (SELECT * FROM narrow WHERE single_source) n ON g.node = n.tokens_node
    UNION ALL
    SELECT n.* EXCLUDE (tokens_node, prompt_ids_node, logprobs_node, messages_node, text_node, single_source),
        p.prompt_token_ids, g.response_token_ids, l.response_logprobs, m.prompt_messages, x.response_text
    FROM (SELECT * FROM narrow WHERE NOT single_source) n
    LEFT JOIN mixed_nodes g ON g.node = n.tokens_node
    LEFT JOIN mixed_nodes p ON p.node = n.prompt_ids_node
    LEFT JOIN mixed_nodes l ON l.node = n.logprobs_node
    LEFT JOIN mixed_nodes m ON m.node = n.messages_node
    LEFT JOIN mixed_nodes x ON x.node = n.text_node
)
SELECT
    run_id, epoch, policy, rollout_id, task_id, group_id, attempt, agent_name,
    turn_index, trace_id, span_id, start_ns,
    prompt_token_ids, response_token_ids, response_logprobs, prompt_messages, response_text,
    reward, advantage, policy_version, model, flags, rollout_return, end_ns, response_id,
    rollout_advantage, turn_advantage
FROM wide
ORDER BY place
