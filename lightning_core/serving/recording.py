"""One model call as the gateway sees it: what the client asked for, what vLLM answered (token ids, logprobs, text,
tool calls, usage, from a JSON answer or an SSE stream), what is stripped before the client gets it, and the span
(one per choice) recorded with the exact sampled ids."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

import orjson
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, TraceFlags
from opentelemetry.trace.status import Status, StatusCode

from lightning_core import semconv
from lightning_core.common import ids

from lightning_core.serving.router import Target
from lightning_core.serving.metrics import GatewayMetrics

log = logging.getLogger("arclight.gateway")


SCOPE = InstrumentationScope("arclight.gateway", "0.1.0")


SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "max_tokens", "max_completion_tokens", "n", "seed",
                 "stop", "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias")


@dataclass
class Capture:
    """What one model call produced, gathered from a JSON answer or an SSE stream."""

    response_id: str | None = None
    response_model: str | None = None
    prompt_token_ids: list[int] | None = None
    choices: dict[int, dict[str, Any]] = field(default_factory=dict)
    usage: dict[str, Any] | None = None

    def choice(self, index: int) -> dict[str, Any]:
        """Return the accumulator of one choice."""
        return self.choices.setdefault(index, {"token_ids": [], "logprobs": [], "text": [], "tool_calls": [], "finish_reason": None})


class SpanRecorder:
    """Builds one span per model call and exports it in batches (resources carry the rollout context)."""

    def __init__(self, exporter: SpanExporter, metrics: GatewayMetrics, *, delay_ms: int = 200):
        self.processor = BatchSpanProcessor(exporter, max_queue_size=65536, max_export_batch_size=1024,
                                            schedule_delay_millis=delay_ms)
        self.metrics = metrics

    def record(self, *, name: str, resource: Resource, parent: SpanContext | None, start_ns: int, end_ns: int,
               attributes: dict[str, Any], error: str | None = None) -> None:
        """Hand one finished span to the batch exporter."""
        trace = parent.trace_id if parent is not None else ids.trace_id()
        context = SpanContext(trace, ids.span_id(), is_remote=False, trace_flags=TraceFlags(TraceFlags.SAMPLED))
        status = Status(StatusCode.ERROR, error) if error else Status(StatusCode.UNSET)
        span = ReadableSpan(
            name=name, context=context, parent=parent, resource=resource, attributes=attributes,
            kind=SpanKind.CLIENT, status=status, start_time=start_ns, end_time=end_ns, instrumentation_scope=SCOPE,
        )
        self.processor.on_end(span)
        self.metrics.spans.inc()

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Export every recorded span now."""
        return self.processor.force_flush(int(timeout_s * 1000))

    def shutdown(self) -> None:
        """Flush and stop the exporter."""
        self.processor.shutdown()


def parse_traceparent(header: str | None) -> SpanContext | None:
    """Return the caller's span context from a W3C ``traceparent`` header, if it has a valid one."""
    if not header:
        return None
    parts = header.strip().split("-")
    if len(parts) < 4 or len(parts[1]) != 32 or len(parts[2]) != 16:
        return None
    try:
        trace_id, span_id, flags = int(parts[1], 16), int(parts[2], 16), int(parts[3][:2], 16)
    except ValueError:
        return None
    if not trace_id or not span_id:
        return None
    return SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(flags))


@dataclass
class Call:
    """One model call in flight: what the client asked for, what vLLM is asked, what came back."""

    operation: str
    body: dict[str, Any]
    target: Target
    resource: Resource
    start_ns: int
    started: float
    parent: SpanContext | None
    client: str | None = None  # the caller's address, as the gateway's socket sees it
    capture: Capture = field(default_factory=Capture)

    @property
    def wants_token_ids(self) -> bool:
        """True when the client asked vLLM for token ids itself."""
        return bool(self.body.get("return_token_ids"))

    @property
    def wants_logprobs(self) -> bool:
        """True when the client asked for logprobs itself."""
        value = self.body.get("logprobs")
        return bool(value) if self.operation == "chat" else value is not None

    @property
    def wants_usage(self) -> bool:
        """True when a streaming client asked for the usage chunk."""
        return bool((self.body.get("stream_options") or {}).get("include_usage"))

    def upstream_body(self) -> dict[str, Any]:
        """Return the request sent to vLLM: the client's, plus token ids, logprobs and usage."""
        body = dict(self.body)
        body["model"] = self.target.served_model
        body["return_token_ids"] = True
        if not self.wants_logprobs:
            if self.operation == "chat":
                body["logprobs"], body["top_logprobs"] = True, 0
            else:
                body["logprobs"] = 0
        if body.get("stream"):
            body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        return body

    def capture_json(self, data: dict[str, Any]) -> None:
        """Gather ids, token ids, logprobs, text and usage from a non-streaming answer."""
        self.capture_chunk(data, streamed=False)

    def capture_chunk(self, data: dict[str, Any], *, streamed: bool = True) -> None:
        """Gather what one answer or SSE chunk carries."""
        cap = self.capture
        cap.response_id = cap.response_id or data.get("id")
        cap.response_model = cap.response_model or data.get("model")
        if data.get("prompt_token_ids") is not None:
            cap.prompt_token_ids = data["prompt_token_ids"]
        if data.get("usage"):
            cap.usage = data["usage"]
        for choice in data.get("choices") or []:
            acc = cap.choice(choice.get("index", 0))
            if choice.get("prompt_token_ids") is not None:
                cap.prompt_token_ids = choice["prompt_token_ids"]
            acc["token_ids"].extend(choice.get("token_ids") or [])
            acc["logprobs"].extend(_sampled_logprobs(choice.get("logprobs"), self.operation))
            if self.operation == "chat":
                message = choice.get("delta" if streamed else "message") or {}
                if message.get("content"):
                    acc["text"].append(message["content"])
                if message.get("tool_calls"):
                    acc["tool_calls"].extend(message["tool_calls"])
            elif choice.get("text"):
                acc["text"].append(choice["text"])
            if choice.get("finish_reason"):
                acc["finish_reason"] = choice["finish_reason"]

    def strip_json(self, data: dict[str, Any]) -> None:
        """Remove from an answer what the client did not ask for."""
        self.strip_chunk(data)

    def strip_chunk(self, data: dict[str, Any]) -> bool:
        """Remove what the client did not ask for; False when the whole chunk should be dropped."""
        if not self.wants_token_ids:
            data.pop("prompt_token_ids", None)
            for choice in data.get("choices") or []:
                choice.pop("token_ids", None)
                choice.pop("prompt_token_ids", None)
        if not self.wants_logprobs:
            for choice in data.get("choices") or []:
                if "logprobs" in choice:
                    choice["logprobs"] = None
        if self.body.get("stream") and not self.wants_usage:
            if data.get("usage") is not None and not data.get("choices"):
                return False
            data.pop("usage", None)
        return True

    def span_attributes(self, *, latency_ms: float, error: str | None, upstream_failed: bool = False) -> list[dict[str, Any]]:
        """Return the attributes of this call's span(s): one per choice (one when there is none)."""
        cap, body, target = self.capture, self.body, self.target
        base: dict[str, Any] = {
            semconv.SPAN_KIND: semconv.KIND_LLM,
            semconv.GEN_AI_OPERATION_NAME: self.operation,
            semconv.GEN_AI_SYSTEM: "vllm",
            semconv.SERVED_MODEL: target.served_model,
            semconv.POLICY_VERSION: target.version,
            semconv.LLM_REPLICA: target.replica,
            semconv.LLM_LATENCY_MS: round(latency_ms, 3),
            semconv.LLM_STREAMED: bool(body.get("stream")),
            semconv.REQUEST_PARAMS: _dumps({k: body[k] for k in SAMPLING_KEYS if k in body}),
        }
        if self.client:
            base[semconv.CLIENT_ADDRESS] = self.client
        if isinstance(body.get("model"), str):
            base[semconv.GEN_AI_REQUEST_MODEL] = body["model"]
        if target.policy is not None:
            base[semconv.POLICY_NAME] = target.policy
        if self.operation == "chat":
            base[semconv.REQUEST_MESSAGES] = _dumps(body.get("messages"))
        else:
            prompt = body.get("prompt")
            base[semconv.REQUEST_PROMPT] = prompt if isinstance(prompt, str) else json.dumps(prompt)
        if cap.response_id:
            base[semconv.GEN_AI_RESPONSE_ID] = cap.response_id
        if cap.response_model:
            base[semconv.GEN_AI_RESPONSE_MODEL] = cap.response_model
        if cap.usage:
            base[semconv.GEN_AI_USAGE_INPUT_TOKENS] = int(cap.usage.get("prompt_tokens") or 0)
            base[semconv.GEN_AI_USAGE_OUTPUT_TOKENS] = int(cap.usage.get("completion_tokens") or 0)
        if cap.prompt_token_ids:
            base[semconv.PROMPT_TOKEN_IDS] = [int(t) for t in cap.prompt_token_ids]
        if error:
            base[semconv.ERROR_TYPE] = error[:2000]
        if upstream_failed:
            base[semconv.LLM_UPSTREAM_FAILED] = True
        if not cap.choices:
            return [base]
        spans = []
        for index in sorted(cap.choices):
            acc = cap.choices[index]
            attrs = dict(base)
            attrs[semconv.RESPONSE_TOKEN_IDS] = [int(t) for t in acc["token_ids"]]
            attrs[semconv.RESPONSE_LOGPROBS] = [float(x) for x in acc["logprobs"]]
            attrs[semconv.RESPONSE_TEXT] = "".join(acc["text"])
            if acc["tool_calls"]:
                attrs[semconv.RESPONSE_TOOL_CALLS] = json.dumps(acc["tool_calls"], ensure_ascii=False)
            if acc["finish_reason"]:
                attrs[semconv.GEN_AI_RESPONSE_FINISH_REASONS] = [str(acc["finish_reason"])]
            if len(cap.choices) > 1:
                attrs[semconv.CHOICE_INDEX] = index
            spans.append(attrs)
        return spans


def _dumps(value: Any) -> str:
    """JSON text of a request value for a span attribute (orjson; the json module for what orjson refuses, such as
    integers beyond 64 bits)."""
    try:
        return orjson.dumps(value, default=str).decode()
    except TypeError:
        return json.dumps(value, ensure_ascii=False, default=str)


def _sampled_logprobs(logprobs: Any, operation: str) -> list[float]:
    """Return the sampled tokens' logprobs from a chat or completions ``logprobs`` object."""
    if not logprobs:
        return []
    if operation == "chat":
        return [float(item["logprob"]) for item in logprobs.get("content") or [] if item.get("logprob") is not None]
    return [float(x) if x is not None else float("nan") for x in logprobs.get("token_logprobs") or []]
