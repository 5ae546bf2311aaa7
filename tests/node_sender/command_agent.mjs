// A Node.js agent run as `rollouts.command` (tests/test_command_agents.py): it knows nothing of Arclight.
// Everything comes from the environment a rollout's program gets, read the way any Node service
// reads it: the OTLP endpoint and resource attributes by the OpenTelemetry JS SDK itself
// (OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, OTEL_RESOURCE_ATTRIBUTES, OTEL_SERVICE_NAME), the model
// from OPENAI_BASE_URL / ARCLIGHT_MODEL, the task from standard input. It makes one chat call per
// question, and prints its reward as its last line of output ({"reward": r}); it exports no reward span.
import { ROOT_CONTEXT, trace } from "@opentelemetry/api";
import { BasicTracerProvider, SimpleSpanProcessor } from "@opentelemetry/sdk-trace-base";
import { OTLPTraceExporter } from "@opentelemetry/exporter-trace-otlp-proto";
import { detectResources, envDetector } from "@opentelemetry/resources";

let input = "";
for await (const chunk of process.stdin) input += chunk;
const task = JSON.parse(input);
const model = process.env.ARCLIGHT_MODEL;
const provider = new BasicTracerProvider({
  resource: detectResources({ detectors: [envDetector] }),
  spanProcessors: [new SimpleSpanProcessor(new OTLPTraceExporter())],
});
const tracer = provider.getTracer("node-command-agent");

async function chat(parent, question, seed) {
  const messages = [{ role: "user", content: question }];
  const span = tracer.startSpan(`chat ${model}`, {}, trace.setSpan(ROOT_CONTEXT, parent));
  span.setAttributes({ "gen_ai.operation.name": "chat", "gen_ai.request.model": model });
  const response = await fetch(`${process.env.OPENAI_BASE_URL}/chat/completions`, {
    method: "POST",
    headers: { "content-type": "application/json", authorization: `Bearer ${process.env.OPENAI_API_KEY}` },
    body: JSON.stringify({ model, messages, max_tokens: 6, temperature: Number(process.env.ARCLIGHT_TEMPERATURE), seed }),
  });
  const body = await response.json();
  if (!response.ok) throw new Error(`chat failed: ${response.status} ${JSON.stringify(body)}`);
  span.setAttributes({ "gen_ai.response.id": body.id, "gen_ai.response.model": body.model });
  span.end();
  return body.id;
}

const agent = tracer.startSpan("agent solver", { attributes: { "gen_ai.agent.name": "solver" } });
const ids = [];
for (const [i, question] of task.questions.entries()) ids.push(await chat(agent, question, i));
agent.end();
await provider.forceFlush();
await provider.shutdown();
console.error(`made ${ids.length} calls: ${ids.join(", ")}`);
process.stdout.write(JSON.stringify({ reward: task.reward, response_ids: ids }) + "\n");
