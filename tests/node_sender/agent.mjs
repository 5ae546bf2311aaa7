// A Node.js agent that knows nothing of Arclight's SDK: it calls an OpenAI-compatible server with
// fetch, traces itself with the OpenTelemetry JS SDK and exports OTLP/protobuf to the collector.
// Its LLM spans carry GenAI attributes and the token ids the server returned (prompt_token_ids /
// response_token_ids, as Agent Lightning writes them); its reward is a span with
// arclight.reward.value alone (no arclight.span.kind).
//
//   node agent.mjs '{"collector": "http://127.0.0.1:4318", "baseUrl": "http://.../v1", "model": "tiny",
//                    "resource": {"arclight.run_id": "...", ...}, "questions": ["..."], "reward": 0.5}'
// Prints {"calls": [{"id", "prompt_token_ids", "response_token_ids", "content"}]} on stdout.
import { ROOT_CONTEXT, trace } from "@opentelemetry/api";
import { BasicTracerProvider, SimpleSpanProcessor } from "@opentelemetry/sdk-trace-base";
import { OTLPTraceExporter } from "@opentelemetry/exporter-trace-otlp-proto";
import { resourceFromAttributes } from "@opentelemetry/resources";

const args = JSON.parse(process.argv[2]);
const provider = new BasicTracerProvider({
  resource: resourceFromAttributes({ "service.name": "node-agent", ...args.resource }),
  spanProcessors: [new SimpleSpanProcessor(new OTLPTraceExporter({ url: `${args.collector}/v1/traces` }))],
});
const tracer = provider.getTracer("node-agent");

// parents are passed explicitly: no context manager is registered for async code
async function chat(parent, question, seed) {
  const messages = [{ role: "user", content: question }];
  const span = tracer.startSpan(`chat ${args.model}`, {}, trace.setSpan(ROOT_CONTEXT, parent));
  span.setAttributes({
    "gen_ai.operation.name": "chat",
    "gen_ai.request.model": args.model,
    "gen_ai.input.messages": JSON.stringify(messages.map((m) => ({ role: m.role, parts: [{ type: "text", content: m.content }] }))),
  });
  const response = await fetch(`${args.baseUrl}/chat/completions`, {
    method: "POST",
    headers: { "content-type": "application/json", authorization: "Bearer unused" },
    body: JSON.stringify({ model: args.model, messages, max_tokens: 6, temperature: 1.0, seed, return_token_ids: true }),
  });
  const body = await response.json();
  if (!response.ok) throw new Error(`chat failed: ${response.status} ${JSON.stringify(body)}`);
  const choice = body.choices[0];
  span.setAttributes({
    "gen_ai.response.id": body.id,
    "gen_ai.response.model": body.model,
    "gen_ai.output.messages": JSON.stringify([{ role: "assistant", parts: [{ type: "text", content: choice.message.content }] }]),
    prompt_token_ids: body.prompt_token_ids,
    response_token_ids: choice.token_ids,
  });
  span.end();
  return { id: body.id, prompt_token_ids: body.prompt_token_ids, response_token_ids: choice.token_ids, content: choice.message.content };
}

const calls = [];
const agent = tracer.startSpan("agent solver", { attributes: { "agent.name": "solver" } });
for (const [i, question] of args.questions.entries()) calls.push(await chat(agent, question, i));
const score = tracer.startSpan("score", {}, trace.setSpan(ROOT_CONTEXT, agent));
score.setAttribute("arclight.reward.value", args.reward);
score.end();
agent.end();
await provider.forceFlush();
await provider.shutdown();
process.stdout.write(JSON.stringify({ calls }) + "\n");
