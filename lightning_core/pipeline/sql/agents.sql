-- agents: one narrow row per span with its owning agent: the nearest agent span among itself and
-- its ancestors in the repaired tree (NULL when none), whether it runs inside a reward function
-- (a reward scope at or above it, sql/span_nodes.sql: an LLM judge), the outermost LLM span above
-- it (nested LLM spans are one model call) and its depth. sql/span_agents.sql adds the span's columns.
-- Reads: span_nodes (sql/span_nodes.sql), repairs (sql/repair.sql).
WITH RECURSIVE
tree AS MATERIALIZED (
    SELECT n.node, r.parent_node, n.is_agent, n.agent_label, n.is_reward_scope, n.is_llm
    FROM span_nodes n JOIN repairs r USING (node)
),
walk (node, agent_node, agent_name, in_reward, llm_root, depth) AS (
    SELECT node,
           CASE WHEN is_agent THEN node END,
           CASE WHEN is_agent THEN agent_label END,
           is_reward_scope,
           CASE WHEN is_llm THEN node END,
           0
    FROM tree WHERE parent_node IS NULL
    UNION ALL
    SELECT c.node,
           CASE WHEN c.is_agent THEN c.node ELSE w.agent_node END,
           CASE WHEN c.is_agent THEN c.agent_label ELSE w.agent_name END,
           w.in_reward OR c.is_reward_scope,
           coalesce(w.llm_root, CASE WHEN c.is_llm THEN c.node END),
           w.depth + 1
    FROM walk w JOIN tree c ON c.parent_node = w.node
)
SELECT * FROM walk
