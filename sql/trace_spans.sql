-- trace_spans: one row per repaired span of one (run, epoch) -- or of the production traces when
-- $run_id is NULL -- as an MLflow trace shows it (lightning_core/epoch/traces.py): the span, its
-- parent in the repaired tree (sql/repaired_spans.sql) and its owning agent; its stored
-- attributes (an LLM span's are left out: its call's fields say what it holds); and for an LLM
-- span the model call it is part of (sql/calls.sql): prompt messages, response text, token
-- counts, model and the policy version that sampled it.
-- Parameters: $run_id, $epoch (as in sql/span_nodes.sql). Reads: span_agents, llm_calls, spans_raw.
WITH
call_of_span AS (
    -- each LLM span's call: the one that chose it or whose outermost span it is, else the
    -- tightest call around it in time (a third instrumentation of the same call)
    SELECT s.node, c.call_key
    FROM span_agents s
    JOIN llm_calls c ON c.grp = s.grp
     AND (c.node = s.node OR c.outer_span_id = s.span_id OR (s.start_ns >= c.start_ns AND s.end_ns <= c.end_ns))
    WHERE s.is_llm
    QUALIFY row_number() OVER (PARTITION BY s.node
                               ORDER BY c.node = s.node DESC, c.outer_span_id = s.span_id DESC, c.end_ns - c.start_ns) = 1
),
stored AS (
    SELECT hash(filename) AS file_key, file_row_number, trace_id, span_id, attributes, status_message
    FROM spans_raw
    WHERE run_id IS NOT DISTINCT FROM $run_id
      AND ($epoch IS NULL OR epoch = $epoch)
)
SELECT s.grp, s.rollout_id, s.node, s.parent_node, s.trace_id, s.span_id, s.original_parent_id, s.repair_reason,
    s.name, s.start_ns, s.end_ns, s.status_code, r.status_message, s.agent_name,
    s.is_llm, s.is_tool, s.is_reward, s.is_reward_scope, s.is_agent, s.is_rollout, s.reward_value,
    CASE WHEN NOT s.is_llm THEN r.attributes END AS attributes,
    c.call_key, c.span_id AS call_span_id, c.prompt_messages, c.response_text, c.model, c.policy_version,
    coalesce(c.prompt_tokens, c.usage_input_tokens) AS input_tokens,
    coalesce(c.response_tokens, c.usage_output_tokens) AS output_tokens,
    c.in_reward
FROM span_agents s
LEFT JOIN stored r ON r.file_key = s.file_key AND r.file_row_number = s.file_row_number
 AND r.trace_id = s.trace_id AND r.span_id = s.span_id
LEFT JOIN call_of_span k ON k.node = s.node
LEFT JOIN llm_calls c ON c.grp = s.grp AND c.call_key = k.call_key
