// The agent as a program (Node.js 18 or later, no packages): Arclight starts it once per rollout.
//
// It gets the task (one line of tasks.jsonl) on standard input, and the rollout in its environment:
// OPENAI_BASE_URL (the rollout's model URL: every call through it is recorded with its token ids),
// OPENAI_API_KEY, ARCLIGHT_MODEL (the model name to ask for), ARCLIGHT_TEMPERATURE, ARCLIGHT_RESOURCES
// (config.yaml's rollouts.resources as JSON), and the OpenTelemetry variables for spans of its own.
// Its last line of output is the rollout's reward: a number, or {"reward": r}. Exit status 0: it succeeded.
// Any language does the same: point `rollouts.command` in config.yaml at it.

let input = "";
for await (const chunk of process.stdin) input += chunk;
const task = JSON.parse(input);
const resources = JSON.parse(process.env.ARCLIGHT_RESOURCES || "{}");

// The model call: any number of them, with your prompt and tools.
const response = await fetch(`${process.env.OPENAI_BASE_URL}/chat/completions`, {
  method: "POST",
  headers: { "content-type": "application/json", authorization: `Bearer ${process.env.OPENAI_API_KEY}` },
  body: JSON.stringify({
    model: process.env.ARCLIGHT_MODEL,
    temperature: Number(process.env.ARCLIGHT_TEMPERATURE),
    max_tokens: resources.max_tokens ?? 16,
    messages: [
      { role: "system", content: "Answer with the number only." },
      { role: "user", content: task.question },
    ],
  }),
});
const body = await response.json();
if (!response.ok) throw new Error(`the model call failed: ${response.status} ${JSON.stringify(body)}`);
const text = body.choices[0].message.content ?? "";

// The reward: how good this rollout was, for this task. Here: the first number in the answer is the right one.
const first = text.match(/-?\d+/);
console.log(JSON.stringify({ reward: first && first[0] === task.answer ? 1.0 : 0.0 }));
