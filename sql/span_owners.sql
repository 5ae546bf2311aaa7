-- span_owners: one narrow row per span of span_nodes with its repaired parent (sql/repair.sql) and
-- its owning agent (sql/agents.sql), without the span-id lookups of sql/span_agents.sql: the
-- pipeline's own readers (calls, rewards, rollout_summary) use this view.
-- Reads: span_nodes, repairs, agent_owners.
SELECT n.*, r.parent_node, r.repair_reason, o.agent_name, o.agent_node, o.in_reward, o.llm_root, o.depth
FROM span_nodes n
JOIN repairs r USING (node)
JOIN agent_owners o USING (node)
