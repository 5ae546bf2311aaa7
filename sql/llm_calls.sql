-- llm_calls: one row per model call (sql/calls.sql) with its wide fields -- prompt and response
-- token ids, logprobs, prompt messages, response text -- each from the span chosen for it.
-- Usually one span (the gateway's) gives them all: such a call joins that span once; a call
-- with a field from another span joins the spans it names, only among those calls.
-- The pipeline keeps this as a view: only the outputs and the triplets read the wide fields.
-- Reads: calls (sql/calls.sql), llm_spans (sql/llm_spans.sql).
WITH
mixed_sources AS (
    SELECT * FROM calls WHERE NOT single_source
),
mixed_nodes AS (
    SELECT s.* FROM llm_spans s
    SEMI JOIN (SELECT unnest([tokens_node, prompt_ids_node, logprobs_node, messages_node, text_node]) AS node
               FROM mixed_sources) m USING (node)
)
SELECT c.* EXCLUDE (tokens_node, prompt_ids_node, logprobs_node, messages_node, text_node, single_source, flags),
    g.prompt_token_ids, g.response_token_ids, g.response_logprobs, g.prompt_messages, g.response_text,
    c.flags
FROM calls c
LEFT JOIN llm_spans g ON g.node = c.tokens_node
WHERE c.single_source
UNION ALL
SELECT c.* EXCLUDE (tokens_node, prompt_ids_node, logprobs_node, messages_node, text_node, single_source, flags),
    p.prompt_token_ids, g.response_token_ids, l.response_logprobs, m.prompt_messages, x.response_text,
    c.flags
FROM mixed_sources c
LEFT JOIN mixed_nodes g ON g.node = c.tokens_node
LEFT JOIN mixed_nodes p ON p.node = c.prompt_ids_node
LEFT JOIN mixed_nodes l ON l.node = c.logprobs_node
LEFT JOIN mixed_nodes m ON m.node = c.messages_node
LEFT JOIN mixed_nodes x ON x.node = c.text_node
