-- llm_calls: one row per model call (sql/calls.sql) with its wide fields -- prompt and response
-- token ids, logprobs, prompt messages, response text -- each from the span chosen for it.
-- Usually one span (the gateway's) gives them all: it is joined once, and another span only
-- for a field that comes from elsewhere. The pipeline keeps this as a view: only the outputs and
-- the triplets read the wide fields.
-- Reads: calls (sql/calls.sql), llm_spans (sql/llm_spans.sql).
SELECT c.* EXCLUDE (tokens_node, prompt_ids_node, logprobs_node, messages_node, text_node, flags),
    CASE WHEN c.prompt_ids_node IS NOT DISTINCT FROM c.tokens_node THEN g.prompt_token_ids ELSE p.prompt_token_ids END AS prompt_token_ids,
    g.response_token_ids,
    CASE WHEN c.logprobs_node IS NOT DISTINCT FROM c.tokens_node THEN g.response_logprobs ELSE l.response_logprobs END AS response_logprobs,
    CASE WHEN c.messages_node IS NOT DISTINCT FROM c.tokens_node THEN g.prompt_messages ELSE m.prompt_messages END AS prompt_messages,
    CASE WHEN c.text_node IS NOT DISTINCT FROM c.tokens_node THEN g.response_text ELSE x.response_text END AS response_text,
    c.flags
FROM calls c
LEFT JOIN llm_spans g ON g.node = c.tokens_node
LEFT JOIN llm_spans p ON p.node = c.prompt_ids_node AND c.prompt_ids_node IS DISTINCT FROM c.tokens_node
LEFT JOIN llm_spans l ON l.node = c.logprobs_node AND c.logprobs_node IS DISTINCT FROM c.tokens_node
LEFT JOIN llm_spans m ON m.node = c.messages_node AND c.messages_node IS DISTINCT FROM c.tokens_node
LEFT JOIN llm_spans x ON x.node = c.text_node AND c.text_node IS DISTINCT FROM c.tokens_node
