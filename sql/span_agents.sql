-- span_agents: one row per repaired span (sql/repaired_spans.sql) with its owning agent's name,
-- node and span id, in_reward (inside a reward function), llm_root and depth (sql/agents.sql).
-- The pipeline keeps this as a view over narrow tables.
-- Reads: repaired_spans, agent_owners (sql/agents.sql), span_nodes.
SELECT s.*, o.agent_name, o.agent_node, a.span_id AS agent_span_id, o.in_reward, o.llm_root, o.depth
FROM repaired_spans s
JOIN agent_owners o USING (node)
LEFT JOIN span_nodes a ON a.node = o.agent_node
