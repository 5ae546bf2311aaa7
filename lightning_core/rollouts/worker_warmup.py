"""Imported once by the rollout fork server, so that every rollout process starts warm.

Each rollout runs in a process forked from one fork server (``runner._mp_context``). Whatever the
server has imported, a rollout gets for free; whatever it has not, every rollout imports again.
Measured here: a rollout process that imported the OTLP exporter, the OpenAI client's chat
resources and their HTTP stack itself spent about 0.65 CPU-s before its first model call.
"""

from __future__ import annotations

import contextlib
import importlib

# What an agent process imports on its first traced model call (seen with sys.modules: the OTLP
# exporter brings requests/urllib3; the OpenAI client brings its chat resources and HTTP stack).
MODULES = (
    "lightning_core.tracing",
    "opentelemetry.sdk.trace",
    "opentelemetry.sdk.trace.export",
    "opentelemetry.exporter.otlp.proto.http.trace_exporter",
    "requests", "urllib3", "charset_normalizer", "certifi",
    "httpx", "httpcore", "httpx2", "httpcore2", "h11", "h2", "anyio", "jiter",
    "anyio._backends._asyncio",  # loaded lazily by an async client's first request (the Agents SDK's AsyncOpenAI)
    "openai", "openai.resources.chat.completions", "openai.types.chat", "openai.types.chat.chat_completion",
    "openai.types.chat.completion_create_params", "openai.types.chat.chat_completion_chunk",
)


def warm() -> None:
    """Import what a rollout needs and build one OpenAI client (its lazy resources load on first use)."""
    for name in MODULES:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    with contextlib.suppress(Exception):
        import openai

        client = openai.OpenAI(base_url="http://127.0.0.1:9/v1", api_key="warm-up", max_retries=0)
        _ = client.chat.completions  # resolves the lazily imported resource classes
        client.close()


warm()
