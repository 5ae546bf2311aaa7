-- repair: one narrow row per span (sql/span_nodes.sql): its repaired parent (parent_node) and the
-- reason it moved (NULL when it did not); sql/repaired_spans.sql adds the span's columns.
--
-- Time-based repair is for spans whose parent is missing or sits in a parent cycle, and for roots
-- that another span of their rollout encloses: such a span moves to the tightest enclosing span
-- of the same rollout (an agent span wins a tie), never to one of its original descendants. A
-- parent that exists in the same rollout is kept even when it does not enclose the span in time
-- (the clocks of two processes differ). An LLM span hung on a span that is neither an agent nor
-- an LLM span (often the root) moves into the tightest agent or LLM span inside that parent that
-- encloses it: an instrumentation lost the context of its agent (agent_skipped) or of the
-- framework's LLM span of the same call (llm_skipped).
-- No cycle can form: every original tree hangs from its root (its anchor); a moved root goes only
-- to a span whose anchor precedes it in the order (start asc, end desc, depth asc, node), and
-- inside a tree a span moves only between spans whose paths from the root keep that order (no
-- parent on the way that fails to enclose its child).
-- $repair = false keeps every parent as sent; a span whose parent is missing or caught in a cycle
-- is then a root. Only narrow columns (ids, times, kinds) travel through here.
-- Parameters: $repair. Reads: span_nodes (sql/span_nodes.sql).
WITH RECURSIVE
linked AS MATERIALIZED (
    -- the original parent, when it exists in the same rollout
    SELECT n.node, n.grp, n.start_ns, n.end_ns, n.is_agent, n.is_llm, n.parent_id,
           p.node AS orig_parent,
           p.start_ns <= n.start_ns AND n.end_ns <= p.end_ns AS parent_encloses
    FROM span_nodes n
    LEFT JOIN span_nodes p ON p.trace_id = n.trace_id AND p.span_id = n.parent_id AND p.grp = n.grp
),
original_paths (node, path, skewed) AS (
    -- root-to-span path in the original tree, and whether a parent on it fails to enclose its
    -- child in time; spans caught in a parent cycle get none
    SELECT node, [node], false FROM linked WHERE orig_parent IS NULL
    UNION ALL
    SELECT c.node, list_append(p.path, c.node), p.skewed OR NOT c.parent_encloses
    FROM original_paths p JOIN linked c ON c.orig_parent = p.node
    WHERE len(p.path) < 1000
),
with_paths AS MATERIALIZED (
    SELECT l.*, o.path, len(o.path) AS depth, coalesce(o.skewed, true) AS skewed,
        CASE
            WHEN l.parent_id IS NULL OR l.parent_id = '' THEN 'root'
            WHEN l.orig_parent IS NULL THEN 'missing_parent'
            WHEN o.path IS NULL THEN 'parent_cycle'
        END AS detach_reason
    FROM linked l LEFT JOIN original_paths o USING (node)
),
detached AS (
    SELECT * FROM with_paths WHERE detach_reason IS NOT NULL AND $repair
),
enclosing_candidates AS (
    -- spans of the same rollout that enclose a detached span, precede it, are not its descendants,
    -- and hang from a root (anchor) that precedes it
    SELECT d.node, c.node AS candidate, c.end_ns - c.start_ns AS width, c.is_agent,
           c.start_ns AS c_start, c.depth AS c_depth
    FROM detached d
    JOIN with_paths c ON c.grp = d.grp
     AND c.start_ns <= d.start_ns AND d.end_ns <= c.end_ns AND c.node <> d.node
    JOIN with_paths anchor ON anchor.node = coalesce(c.path[1], c.node)
    WHERE (c.start_ns < d.start_ns OR c.end_ns > d.end_ns
           OR (coalesce(c.depth, 1000000), c.node) < (coalesce(d.depth, 1000000), d.node))
      AND coalesce(NOT list_contains(c.path, d.node), false)
      AND (anchor.start_ns, -anchor.end_ns, coalesce(anchor.depth, 1000000), anchor.node)
          < (d.start_ns, -d.end_ns, coalesce(d.depth, 1000000), d.node)
),
tightest_parent AS (
    SELECT node, candidate FROM enclosing_candidates
    QUALIFY row_number() OVER (PARTITION BY node
        ORDER BY width, is_agent DESC, c_start DESC, c_depth DESC NULLS LAST, candidate DESC) = 1
),
skipped_into AS (
    -- an LLM span hung on a span that is neither an agent nor an LLM span (often the root) while
    -- an agent or LLM span inside that parent encloses it: time recovers the lost context; the
    -- tightest wins, an LLM span on a tie (the framework's span of the same call)
    SELECT s.node, a.node AS candidate, a.is_agent
    FROM with_paths s
    JOIN with_paths p ON p.node = s.orig_parent AND NOT p.is_agent AND NOT p.is_llm
    JOIN with_paths a ON a.grp = s.grp AND (a.is_agent OR a.is_llm)
     AND a.start_ns <= s.start_ns AND s.end_ns <= a.end_ns
     AND a.end_ns - a.start_ns < p.end_ns - p.start_ns
    WHERE $repair AND s.is_llm AND s.detach_reason IS NULL AND NOT s.skewed AND NOT a.skewed
      AND list_contains(a.path, p.node) AND NOT list_contains(a.path, s.node)
      AND (a.start_ns < s.start_ns OR a.end_ns > s.end_ns OR (a.depth, a.node) < (s.depth, s.node))
    QUALIFY row_number() OVER (PARTITION BY s.node
        ORDER BY a.end_ns - a.start_ns, a.is_llm DESC, a.start_ns DESC, a.node DESC) = 1
),
new_parent AS (
    SELECT w.node, w.detach_reason, w.depth, si.candidate AS skipped_candidate, si.is_agent AS skipped_into_agent,
        tp.candidate AS enclosing_candidate,
        coalesce(si.candidate, tp.candidate, CASE WHEN w.detach_reason IS NULL THEN w.orig_parent END) AS parent_node
    FROM with_paths w
    LEFT JOIN tightest_parent tp ON tp.node = w.node
    LEFT JOIN skipped_into si ON si.node = w.node
)
SELECT
    node, parent_node,
    CASE WHEN skipped_candidate IS NOT NULL THEN CASE WHEN skipped_into_agent THEN 'agent_skipped' ELSE 'llm_skipped' END
         WHEN enclosing_candidate IS NOT NULL AND detach_reason = 'root' THEN 'enclosed_root'
         WHEN enclosing_candidate IS NOT NULL THEN detach_reason
         WHEN detach_reason IN ('missing_parent', 'parent_cycle')
             THEN detach_reason || CASE WHEN $repair THEN '_no_enclosing_span' ELSE '_not_repaired' END
    END AS repair_reason
FROM new_parent
