-- advantages: the triplets with their GRPO advantage. R (the rollout's return) is taken once per
-- rollout; each group (task) gets mean and sample std of R over its rollouts; a rollout's
-- advantage R - mean, divided by (std + 1e-4) when $normalize_std, goes to all its calls.
-- Groups whose returns are all equal (or that hold one rollout) get advantage 0 and the flag
-- 'zero_advantage_group': they train nothing.
-- The wide fields (token ids, logprobs, messages, text) are joined last, from the spans that
-- sql/calls.sql chose for them, with the narrow rows as the hash join's build side: the wide rows
-- stream through one join and one sort, on one integer (the row's place, numbered on the narrow
-- rows: sorting wide rows on the string keys costs DuckDB about twice the time and memory).
-- (sql/llm_calls.sql does the same join for all calls.)
-- Reads: triplet_rows (sql/triplets.sql), calls (sql/calls.sql), llm_spans (sql/llm_spans.sql).
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
narrow AS MATERIALIZED (
    SELECT
        -- the output order: by group, rollout, turn (grp tells apart traces with no rollout id)
        row_number() OVER (ORDER BY t.group_id, t.rollout_id, t.grp, t.turn_index) AS place,
        t.run_id, t.epoch, t.policy, t.rollout_id, t.task_id, t.group_id, t.attempt, t.agent_name,
        t.turn_index, t.trace_id, t.span_id, t.start_ns,
        t.reward, a.advantage, c.policy_version, c.model,
        CASE WHEN a.all_equal THEN list_append(t.flags, 'zero_advantage_group') ELSE t.flags END AS flags,
        t.rollout_return, t.end_ns, t.response_id,
        c.tokens_node, c.prompt_ids_node, c.logprobs_node, c.messages_node, c.text_node, c.single_source
    FROM triplet_rows t
    JOIN rollout_advantages a USING (grp)
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
    reward, advantage, policy_version, model, flags, rollout_return, end_ns, response_id
FROM wide
ORDER BY place
