-- agents: one row per repaired span with its owning agent: the nearest agent span among itself
-- and its ancestors in the repaired tree (NULL when none), whether it runs inside a reward
-- function (a reward span above it: an LLM judge), and the outermost LLM span above it (nested
-- LLM spans are one model call). The LLM spans' attributes stay in repaired_spans.
-- Reads: repaired_spans (sql/repair.sql).
WITH RECURSIVE
walk (node, agent_node, agent_name, in_reward, llm_root, depth) AS (
    SELECT node,
           CASE WHEN is_agent THEN node END,
           CASE WHEN is_agent THEN agent_label END,
           is_reward,
           CASE WHEN is_llm THEN node END,
           0
    FROM repaired_spans WHERE parent_node IS NULL
    UNION ALL
    SELECT c.node,
           CASE WHEN c.is_agent THEN c.node ELSE w.agent_node END,
           CASE WHEN c.is_agent THEN c.agent_label ELSE w.agent_name END,
           w.in_reward OR c.is_reward,
           coalesce(w.llm_root, CASE WHEN c.is_llm THEN c.node END),
           w.depth + 1
    FROM walk w JOIN repaired_spans c ON c.parent_node = w.node
),
owning_agent AS (
    SELECT w.*, a.span_id AS agent_span_id
    FROM walk w LEFT JOIN repaired_spans a ON a.node = w.agent_node
)
SELECT s.* EXCLUDE (llm_attributes), o.agent_name, o.agent_node, o.agent_span_id, o.in_reward, o.llm_root, o.depth
FROM repaired_spans s JOIN owning_agent o USING (node)
