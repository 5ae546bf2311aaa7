-- prompt_reflections: what GEPA's reflection model reads about one evaluation of a prompt candidate. One row per
-- task: its lowest-reward rollout (successes included; ties broken by rollout id), every model call of it in
-- order (request messages, reply, the agent whose span encloses the call), and the tool spans that failed.
-- Reads the catalog's rollouts table and spans view. Parameters: $run_id, $epoch.
WITH worst AS (
    SELECT rollout_id, task_id, task, reward, status, error
    FROM rollouts
    WHERE run_id = $run_id AND epoch = $epoch AND status <> 'planned'
    QUALIFY row_number() OVER (PARTITION BY task_id ORDER BY coalesce(reward, -1e308), rollout_id) = 1
),
rollout_spans AS (
    SELECT rollout_id, span_id, name, span_kind, agent_name, start_ns, end_ns, status_code, status_message, attributes
    FROM spans
    WHERE run_id = $run_id AND epoch = $epoch AND rollout_id IN (SELECT rollout_id FROM worst)
),
agent_spans AS (
    SELECT rollout_id, span_id, agent_name, start_ns, end_ns FROM rollout_spans WHERE span_kind = 'agent'
),
llm_spans AS (
    SELECT rollout_id, span_id, start_ns, end_ns,
           json_extract_string(attributes, '$."arclight.llm.request_messages"') AS messages,
           json_extract_string(attributes, '$."arclight.llm.response_text"') AS response
    FROM rollout_spans WHERE span_kind = 'llm'
),
tightest_agent AS (
    SELECT l.span_id, a.agent_name
    FROM llm_spans l JOIN agent_spans a
      ON a.rollout_id = l.rollout_id AND a.start_ns <= l.start_ns AND a.end_ns >= l.end_ns
    QUALIFY row_number() OVER (PARTITION BY l.span_id ORDER BY a.start_ns DESC, a.span_id) = 1
),
calls AS (
    SELECT l.rollout_id,
           list({'agent': t.agent_name, 'messages': l.messages, 'response': l.response} ORDER BY l.end_ns, l.span_id) AS calls
    FROM llm_spans l LEFT JOIN tightest_agent t USING (span_id)
    GROUP BY l.rollout_id
),
failed_tools AS (
    SELECT rollout_id, list({'tool': name, 'error': status_message} ORDER BY start_ns, span_id) AS failed_tools
    FROM rollout_spans
    WHERE span_kind = 'tool' AND status_code = 'ERROR'
    GROUP BY rollout_id
)
SELECT w.rollout_id, w.task_id, w.task, w.reward, w.status, w.error,
       to_json(coalesce(c.calls, [])) AS calls, to_json(coalesce(f.failed_tools, [])) AS failed_tools
FROM worst w LEFT JOIN calls c USING (rollout_id) LEFT JOIN failed_tools f USING (rollout_id)
ORDER BY w.task_id
