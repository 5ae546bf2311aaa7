-- llm_calls: one row per model call (sql/calls.sql) with its wide fields -- prompt and response
-- token ids, logprobs, prompt messages, response text -- each joined from the span chosen for it.
-- The pipeline keeps this as a view: only the outputs and the triplets read the wide fields.
-- Reads: calls (sql/calls.sql), llm_spans (sql/llm_spans.sql).
SELECT c.* EXCLUDE (tokens_node, prompt_ids_node, logprobs_node, messages_node, text_node,
                    prompt_tokens, response_tokens, flags),
    p.prompt_token_ids, t.response_token_ids, l.response_logprobs, m.prompt_messages, x.response_text,
    c.flags
FROM calls c
LEFT JOIN llm_spans p ON p.node = c.prompt_ids_node
LEFT JOIN llm_spans t ON t.node = c.tokens_node
LEFT JOIN llm_spans l ON l.node = c.logprobs_node
LEFT JOIN llm_spans m ON m.node = c.messages_node
LEFT JOIN llm_spans x ON x.node = c.text_node
