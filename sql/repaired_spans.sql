-- repaired_spans: one row per span of the selected (run, epoch) with its repaired parent (node and
-- ids), its original parent id, why it moved (repair_reason) and its classification.
-- The pipeline keeps this as a view over two narrow tables.
-- Reads: span_nodes (sql/span_nodes.sql), repairs (sql/repair.sql).
SELECT
    n.run_id, n.epoch, n.rollout_id, n.task_id, n.attempt, n.grp, n.node,
    n.trace_id, n.span_id, n.name, n.start_ns, n.end_ns, n.status_code, n.file_key, n.file_row_number,
    r.parent_node,
    np.trace_id AS parent_trace_id,
    np.span_id AS parent_span_id,
    n.parent_id AS original_parent_id,
    r.repair_reason,
    n.is_llm, n.is_tool, n.is_reward, n.is_reward_scope, n.is_agent, n.is_rollout, n.agent_label,
    n.reward_value, n.rollout_status, n.has_exception
FROM span_nodes n
JOIN repairs r USING (node)
LEFT JOIN span_nodes np ON np.node = r.parent_node
