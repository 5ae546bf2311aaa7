-- arrivals: one row per rollout of ($run_id, $epoch) in $mode that the runner recorded as succeeded -- or as
-- failed by the agent, or timed out, which a call our side failed may have caused (a program agent's exit status
-- cannot say whose failure it was; a call that hung on our vLLM runs the rollout out of time) --, with what of its
-- recorded attempt reached the lake. The ingest barrier (stages.ingest_barrier) runs it once every span
-- is durable (the agents flushed before reporting, the gateway just flushed) and fails the rollouts it names:
--   verdict 'spans_lost'      no span at all, not even the runner's rollout span: the collector never stored them
--                             (infrastructure: the rollout runs again)
--   verdict 'upstream_failed' a model call of the attempt that our side failed: the gateway could not reach vLLM,
--                             vLLM answered 5xx or broke off (arclight.llm.upstream_failed; infrastructure: the
--                             agent may have carried on with an error it caught, so its reward says nothing)
--   verdict 'no_spans'        only the runner's own spans: the agent recorded nothing (the agent's failure)
--   verdict NULL              what a rollout should leave: it stays as the runner recorded it
-- A rollout the agent failed, or that timed out, gets only the 'upstream_failed' verdict: that it left few spans is
-- its own doing (or the timeout's).
-- Reads: rollouts (the state table), spans.
WITH
ran AS (
    SELECT rollout_id, attempt, status FROM rollouts
    WHERE run_id = $run_id AND epoch = $epoch AND mode = $mode
      AND (status IN ('succeeded', 'timed_out') OR (status = 'failed' AND error_kind = 'agent'))
),
arrived AS (
    SELECT rollout_id, attempt,
        count(*) AS spans,
        count(*) FILTER (WHERE coalesce(span_kind, '') NOT IN ('rollout', 'rollout_outcome')) AS agent_spans,
        count(*) FILTER (WHERE span_kind = 'llm'
                         AND json_extract(attributes, '$."arclight.llm.upstream_failed"')::BOOLEAN) AS failed_calls,
        min(json_extract_string(attributes, '$."error.type"'))
            FILTER (WHERE json_extract(attributes, '$."arclight.llm.upstream_failed"')::BOOLEAN) AS failed_call_error
    FROM spans
    WHERE run_id = $run_id AND epoch = $epoch AND rollout_id IS NOT NULL
    GROUP BY rollout_id, attempt
)
SELECT r.rollout_id, r.attempt,
    coalesce(a.spans, 0) AS spans,
    coalesce(a.agent_spans, 0) AS agent_spans,
    coalesce(a.failed_calls, 0) AS failed_calls,
    a.failed_call_error,
    CASE WHEN a.failed_calls > 0 THEN 'upstream_failed'
         WHEN r.status <> 'succeeded' THEN NULL
         WHEN a.spans IS NULL THEN 'spans_lost'
         WHEN a.agent_spans = 0 THEN 'no_spans'
    END AS verdict
FROM ran r
LEFT JOIN arrived a ON a.rollout_id = r.rollout_id AND a.attempt IS NOT DISTINCT FROM r.attempt
ORDER BY r.rollout_id
