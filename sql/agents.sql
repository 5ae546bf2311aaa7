-- agents: one narrow row per span with its owning agent: the nearest agent span among itself and
-- its ancestors in the repaired tree (NULL when none; an agent span named only by its span name,
-- '<agent>.<method>', inside an agent called <agent> is that same agent, and does not own anything), whether it runs inside a reward function
-- (a reward scope at or above it, sql/span_nodes.sql: an LLM judge), the outermost LLM span above
-- it (nested LLM spans are one model call) and its depth. sql/span_agents.sql adds the span's columns.
-- Reads: span_nodes (sql/span_nodes.sql), repairs (sql/repair.sql).
WITH RECURSIVE
tree AS MATERIALIZED (
    SELECT n.node, r.parent_node, n.is_agent, n.agent_label, n.agent_label_from_name, n.is_reward_scope, n.is_llm
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
    SELECT node,
           CASE WHEN owns THEN node ELSE parent_agent_node END,
           CASE WHEN owns THEN agent_label ELSE parent_agent_name END,
           in_reward OR is_reward_scope,
           coalesce(parent_llm_root, CASE WHEN is_llm THEN node END),
           depth + 1
    FROM (
        SELECT c.*, w.agent_node AS parent_agent_node, w.agent_name AS parent_agent_name, w.in_reward,
               w.llm_root AS parent_llm_root, w.depth,
               -- an agent span owns what is under it, unless it is named by its span name alone as the same agent
               -- as the one it runs in ('solver.on_messages_stream' inside 'solver')
               c.is_agent AND NOT coalesce(c.agent_label_from_name AND (c.agent_label = w.agent_name
                                           OR starts_with(c.agent_label, w.agent_name || '.')), false) AS owns
        FROM walk w JOIN tree c ON c.parent_node = w.node
    )
)
SELECT * FROM walk
