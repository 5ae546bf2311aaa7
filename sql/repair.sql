-- repair: one narrow row per span (sql/span_nodes.sql): its repaired parent (parent_node) and the
-- reason it moved (NULL when it did not); sql/repaired_spans.sql adds the span's columns.
--
-- A span moves when its parent is missing, does not enclose it in time, or sits in a parent
-- cycle; a root moves when another span of its rollout encloses it. It moves to the tightest
-- enclosing span of the same rollout (an agent span wins a tie), never to one of its original
-- descendants. Every edge goes from a span to one that precedes it in the order
-- (start asc, end desc, original depth asc, node), so the result has no cycle.
-- Only narrow columns (ids, times, kinds) travel through here.
-- Reads: span_nodes (sql/span_nodes.sql).
WITH RECURSIVE
linked AS MATERIALIZED (
    -- the original parent, when it exists in the same rollout
    SELECT n.node, n.grp, n.start_ns, n.end_ns, n.is_agent, n.is_llm, n.parent_id,
           p.node AS orig_parent,
           p.start_ns <= n.start_ns AND n.end_ns <= p.end_ns AS parent_encloses
    FROM span_nodes n
    LEFT JOIN span_nodes p ON p.trace_id = n.trace_id AND p.span_id = n.parent_id AND p.grp = n.grp
),
original_paths (node, path) AS (
    -- root-to-span path in the original tree; spans caught in a parent cycle get none
    SELECT node, [node] FROM linked WHERE orig_parent IS NULL
    UNION ALL
    SELECT c.node, list_append(p.path, c.node)
    FROM original_paths p JOIN linked c ON c.orig_parent = p.node
    WHERE len(p.path) < 1000
),
with_paths AS MATERIALIZED (
    SELECT l.*, o.path, len(o.path) AS depth,
        CASE
            WHEN l.parent_id IS NULL OR l.parent_id = '' THEN 'root'
            WHEN l.orig_parent IS NULL THEN 'missing_parent'
            WHEN o.path IS NULL THEN 'parent_cycle'
            WHEN NOT l.parent_encloses THEN 'outside_parent'
        END AS detach_reason
    FROM linked l LEFT JOIN original_paths o USING (node)
),
detached AS (
    SELECT * FROM with_paths WHERE detach_reason IS NOT NULL
),
enclosing_candidates AS (
    -- spans of the same rollout that enclose a detached span, precede it, and are not its descendants
    SELECT d.node, c.node AS candidate, c.end_ns - c.start_ns AS width, c.is_agent,
           c.start_ns AS c_start, c.depth AS c_depth
    FROM detached d
    JOIN with_paths c ON c.grp = d.grp
     AND c.start_ns <= d.start_ns AND d.end_ns <= c.end_ns AND c.node <> d.node
    WHERE (c.start_ns < d.start_ns OR c.end_ns > d.end_ns
           OR (coalesce(c.depth, 1000000), c.node) < (coalesce(d.depth, 1000000), d.node))
      AND coalesce(NOT list_contains(c.path, d.node), false)
),
tightest_parent AS (
    SELECT node, candidate FROM enclosing_candidates
    QUALIFY row_number() OVER (PARTITION BY node
        ORDER BY width, is_agent DESC, c_start DESC, c_depth DESC NULLS LAST, candidate DESC) = 1
),
skipped_agent AS (
    -- an LLM span hung on a non-agent span (often the root) while an agent span inside that
    -- parent encloses it: the instrumentation lost the agent's context, time recovers it
    SELECT s.node, a.node AS candidate
    FROM with_paths s
    JOIN with_paths p ON p.node = s.orig_parent AND NOT p.is_agent AND NOT p.is_llm
    JOIN with_paths a ON a.grp = s.grp AND a.is_agent
     AND a.start_ns <= s.start_ns AND s.end_ns <= a.end_ns
     AND a.end_ns - a.start_ns < p.end_ns - p.start_ns
    WHERE s.is_llm AND s.detach_reason IS NULL
      AND list_contains(a.path, p.node) AND NOT list_contains(a.path, s.node)
      AND (a.start_ns < s.start_ns OR a.end_ns > s.end_ns OR (a.depth, a.node) < (s.depth, s.node))
    QUALIFY row_number() OVER (PARTITION BY s.node ORDER BY a.end_ns - a.start_ns, a.start_ns DESC, a.node DESC) = 1
),
new_parent AS (
    SELECT w.node, w.detach_reason, w.depth, sa.candidate AS agent_candidate, tp.candidate AS enclosing_candidate,
        coalesce(sa.candidate, tp.candidate, CASE WHEN w.detach_reason IS NULL THEN w.orig_parent END) AS parent_node
    FROM with_paths w
    LEFT JOIN tightest_parent tp ON tp.node = w.node
    LEFT JOIN skipped_agent sa ON sa.node = w.node
)
SELECT
    node, parent_node,
    CASE WHEN agent_candidate IS NOT NULL THEN 'agent_skipped'
         WHEN enclosing_candidate IS NOT NULL AND detach_reason = 'root' THEN 'enclosed_root'
         WHEN enclosing_candidate IS NOT NULL THEN detach_reason
         WHEN detach_reason IN ('missing_parent', 'parent_cycle', 'outside_parent') THEN detach_reason || '_no_enclosing_span'
    END AS repair_reason
FROM new_parent
