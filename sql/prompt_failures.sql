-- prompt_failures: the lowest-reward rollouts of one prompt evaluation, one per task, each with
-- its last model call: the request messages (the conversation so far) and the reply. Prompt
-- optimisation shows these to its critic (the "textual gradient" is computed from them).
-- Reads the catalog's rollouts table and spans view. Parameters: $run_id, $epoch, $success (a
-- reward at or above it is a success), $limit.
WITH failed AS (
    SELECT rollout_id, task_id, task, reward, status, error
    FROM rollouts
    WHERE run_id = $run_id AND epoch = $epoch AND status <> 'planned'
      AND coalesce(reward, -1e308) < $success
    QUALIFY row_number() OVER (PARTITION BY task_id ORDER BY coalesce(reward, -1e308), rollout_id) = 1
),
last_call AS (
    SELECT rollout_id,
           json_extract_string(attributes, '$."arclight.llm.request_messages"') AS messages,
           json_extract_string(attributes, '$."arclight.llm.response_text"') AS response
    FROM spans
    WHERE run_id = $run_id AND epoch = $epoch AND span_kind = 'llm'
      AND rollout_id IN (SELECT rollout_id FROM failed)
    QUALIFY row_number() OVER (PARTITION BY rollout_id ORDER BY end_ns DESC, span_id) = 1
)
SELECT f.rollout_id, f.task_id, f.task, f.reward, f.status, f.error, c.messages, c.response
FROM failed f LEFT JOIN last_call c USING (rollout_id)
ORDER BY coalesce(f.reward, -1e308), f.task_id
LIMIT $limit
