-- Analyst views over the pipeline's outputs in the lake (written by `arclight triplets` and the
-- epoch flow). {…} placeholders are the file lists of one version of each output's Delta table,
-- which the caller pastes as quoted literals (triplet_store.views_sql): view DDL cannot take bound
-- parameters. Runs from `_production` are production traces (run_id NULL); the first file of each
-- list is an empty typed file (run `_schema`) that keeps the views valid on an empty lake.

-- llm_calls: one row per model call (gateway and instrumentation spans of a call merged), with
-- its owning agent, token counts, messages, model, policy version and flags. Its token ids and
-- logprobs are in the triplets, and in the spans view's typed columns (join on span_id).
CREATE OR REPLACE VIEW llm_calls AS
SELECT * REPLACE (CASE WHEN run_id = '_production' THEN NULL ELSE run_id END AS run_id,
                  CASE WHEN run_id = '_production' THEN NULL ELSE epoch END AS epoch)
FROM read_parquet({llm_calls}, hive_partitioning = true, hive_types = {'run_id': VARCHAR, 'epoch': BIGINT}, union_by_name = true)
WHERE run_id <> '_schema';

-- rewards: one row per reward signal: a reward span (value NULL when it was None), an
-- automatic tool-failure penalty or a tool's own reward, with the call it is charged to.
CREATE OR REPLACE VIEW rewards AS
SELECT * REPLACE (CASE WHEN run_id = '_production' THEN NULL ELSE run_id END AS run_id,
                  CASE WHEN run_id = '_production' THEN NULL ELSE epoch END AS epoch)
FROM read_parquet({rewards}, hive_partitioning = true, hive_types = {'run_id': VARCHAR, 'epoch': BIGINT}, union_by_name = true)
WHERE run_id <> '_schema';

-- triplets: one row per training sample: a selected model call of one policy with prompt and
-- response token ids, logprobs, reward, GRPO advantage (with its rollout and turn terms) and flags.
CREATE OR REPLACE VIEW triplets AS
SELECT * REPLACE (CASE WHEN run_id = '_production' THEN NULL ELSE run_id END AS run_id,
                  CASE WHEN run_id = '_production' THEN NULL ELSE epoch END AS epoch)
FROM read_parquet({triplets}, hive_partitioning = true,
                  hive_types = {'run_id': VARCHAR, 'epoch': BIGINT, 'policy': VARCHAR}, union_by_name = true)
WHERE run_id <> '_schema';

-- rollout_summary: one row per rollout: status, final reward, calls, tokens, duration, agents,
-- span coverage, repairs and flags.
CREATE OR REPLACE VIEW rollout_summary AS
SELECT * REPLACE (CASE WHEN run_id = '_production' THEN NULL ELSE run_id END AS run_id,
                  CASE WHEN run_id = '_production' THEN NULL ELSE epoch END AS epoch)
FROM read_parquet({rollout_summary}, hive_partitioning = true, hive_types = {'run_id': VARCHAR, 'epoch': BIGINT}, union_by_name = true)
WHERE run_id <> '_schema';

-- agents: one row per (run, epoch, agent) discovered in the calls: call counts, rollouts and
-- tokens -- the names a policy's agent_match is written against.
CREATE OR REPLACE VIEW agents AS
SELECT run_id, epoch, agent_name,
       count(*) FILTER (WHERE NOT in_reward) AS calls,
       count(*) FILTER (WHERE in_reward) AS judge_calls,
       count(DISTINCT grp) AS rollouts,
       count(*) FILTER (WHERE list_contains(flags, 'missing_token_ids')) AS calls_missing_token_ids,
       sum(prompt_tokens) AS prompt_tokens,
       sum(response_tokens) AS response_tokens,
       make_timestamp_ns(min(start_ns)) AS first_call, make_timestamp_ns(max(end_ns)) AS last_call
FROM llm_calls
GROUP BY ALL;
