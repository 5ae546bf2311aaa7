-- span_shapes: one row per span name among the spans of the given rollouts: how many spans have
-- it and the attribute keys they carry (read from up to 50 spans of that name), so a person can
-- see which convention of docs/span-conventions.md their instrumentation writes, or misses.
-- Parameters: $run_id (NULL = production traces), $epoch (NULL = every epoch), $groups (rollout
-- ids, or trace ids of spans without one). Reads: spans_raw.
WITH
wanted AS (
    SELECT DISTINCT unnest($groups::VARCHAR[]) AS grp
),
chosen AS (
    SELECT s.name, s.attributes, s.prompt_token_ids IS NOT NULL AS has_prompt_ids,
        s.response_token_ids IS NOT NULL AS has_response_ids, s.response_logprobs IS NOT NULL AS has_logprobs
    FROM spans_raw s
    SEMI JOIN wanted w ON w.grp = coalesce(s.rollout_id, s.trace_id)
    WHERE s.run_id IS NOT DISTINCT FROM $run_id
      AND ($epoch IS NULL OR s.epoch = $epoch)
),
counted AS (
    SELECT name, count(*) AS spans FROM chosen GROUP BY name
),
sampled AS (
    SELECT * FROM chosen QUALIFY row_number() OVER (PARTITION BY name) <= 50
),
sampled_keys AS (
    -- the typed columns' keys left the attribute JSON at ingest: name them again
    SELECT name, unnest(list_concat(
        CASE WHEN json_valid(attributes) THEN json_keys(attributes) ELSE [] END,
        CASE WHEN has_prompt_ids THEN ['arclight.llm.prompt_token_ids'] ELSE [] END,
        CASE WHEN has_response_ids THEN ['arclight.llm.response_token_ids'] ELSE [] END,
        CASE WHEN has_logprobs THEN ['arclight.llm.response_logprobs'] ELSE [] END)) AS attribute_key
    FROM sampled
),
keys_by_name AS (
    SELECT name, list(DISTINCT attribute_key ORDER BY attribute_key) AS attribute_keys FROM sampled_keys GROUP BY name
)
SELECT c.name, c.spans, coalesce(k.attribute_keys, []) AS attribute_keys
FROM counted c LEFT JOIN keys_by_name k USING (name)
ORDER BY c.spans DESC, c.name
