"""A Python agent run as ``rollouts.command`` from its own virtualenv (tests/test_command_agents.py).

It imports nothing of Arclight: the OpenAI client reads ``OPENAI_BASE_URL`` / ``OPENAI_API_KEY``,
the OpenTelemetry SDK reads the OTLP endpoint and ``OTEL_RESOURCE_ATTRIBUTES``, and the trace goes
on under the runner's ``rollout`` span (``TRACEPARENT``). The task comes on standard input:
``{"questions": [...], "reward": r}`` makes one call per question inside agent ``solver`` and gives
``r`` as a reward span; ``{"behaviour": "report"}`` writes what it was given to ``report_file`` and prints reward 0.25; ``"fail"`` exits 3;
``"hang"`` starts a child that sleeps and waits for it (the runner's timeout must stop both).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time


def main() -> int:
    task = json.loads(sys.stdin.readline())
    behaviour = task.get("behaviour", "chat")
    if behaviour == "report":
        keys = [k for k in os.environ if k.startswith(("ARCLIGHT_", "OTEL_", "OPENAI_", "MY_")) or k == "TRACEPARENT"]
        with open(task["report_file"], "w") as f:
            json.dump({"task": task, "cwd": os.getcwd(), "python": sys.executable,
                       "env": {k: os.environ[k] for k in sorted(keys)}}, f)
        print("some chatter before the result")
        print(json.dumps({"reward": 0.25}))
        return 0
    if behaviour == "fail":
        print(f"cannot solve {task['id']}: the tool is broken", file=sys.stderr)
        return 3
    if behaviour == "hang":
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        print(child.pid, flush=True)
        with open(task["pid_file"], "w") as f:
            f.write(str(child.pid))
        time.sleep(600)
        return 0
    return chat(task)


def chat(task: dict) -> int:
    from openai import OpenAI
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    provider = TracerProvider(resource=Resource.create())
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    tracer = provider.get_tracer("otel-command-agent")
    parent = TraceContextTextMapPropagator().extract({"traceparent": os.environ.get("TRACEPARENT", "")})
    client = OpenAI(max_retries=0)
    with tracer.start_as_current_span("invoke_agent solver", context=parent, attributes={"gen_ai.agent.name": "solver"}):
        for i, question in enumerate(task["questions"]):
            with tracer.start_as_current_span("chat", attributes={"gen_ai.operation.name": "chat"}) as span:
                response = client.chat.completions.create(
                    model=os.environ["ARCLIGHT_MODEL"], messages=[{"role": "user", "content": question}],
                    max_tokens=6, temperature=float(os.environ["ARCLIGHT_TEMPERATURE"]), seed=i)
                span.set_attribute("gen_ai.response.id", response.id)
        with tracer.start_as_current_span("score", attributes={"arclight.reward.value": float(task["reward"])}):
            pass
    provider.force_flush()
    provider.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
