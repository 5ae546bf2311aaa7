"""A stand-in for vLLM's OpenAI server that answers with token ids and logprobs, or misbehaves on
request: the first user message names the behaviour (``broken json``, ``json list``,
``garbage line``, anything else answers normally). Plus ``serve_in_thread`` to run any ASGI app."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route


def _answer(body: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{time.time_ns()}", "object": "chat.completion", "model": body.get("model"),
        "prompt_token_ids": [1, 2, 3],
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "four"}, "finish_reason": "stop",
                     "token_ids": [7, 8], "logprobs": {"content": [{"token": "fo", "logprob": -0.5}, {"token": "ur", "logprob": -0.25}]}}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
    }


def _chunks(body: dict[str, Any], behaviour: str) -> list[str]:
    base = {"id": f"chatcmpl-{time.time_ns()}", "object": "chat.completion.chunk", "model": body.get("model")}
    lines = [json.dumps({**base, "prompt_token_ids": [1, 2, 3],
                         "choices": [{"index": 0, "delta": {"role": "assistant", "content": "fo"}, "token_ids": [7],
                                      "logprobs": {"content": [{"token": "fo", "logprob": -0.5}]}}]})]
    if behaviour == "garbage line":
        lines.append("<html>upstream proxy error</html>")
    lines.append(json.dumps({**base, "choices": [{"index": 0, "delta": {"content": "ur"}, "token_ids": [8], "finish_reason": "stop",
                                                   "logprobs": {"content": [{"token": "ur", "logprob": -0.25}]}}]}))
    lines.append(json.dumps({**base, "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}))
    return lines


async def chat(request: Request) -> Response:
    body = await request.json()
    behaviour = str((body.get("messages") or [{}])[0].get("content", ""))
    if body.get("stream"):
        async def events():
            for line in _chunks(body, behaviour):
                yield f"data: {line}\n\n".encode()
                await asyncio.sleep(0)
            yield b"data: [DONE]\n\n"
        return StreamingResponse(events(), media_type="text/event-stream")
    if behaviour == "broken json":
        return Response(b'{"id": "x", "choices": [', media_type="application/json")
    if behaviour == "json list":
        return Response(b"[1, 2, 3]", media_type="application/json")
    # which replica answered (the gateway passes system_fingerprint through): tests of replica stickiness read it
    return JSONResponse({**_answer(body), "system_fingerprint": f"port-{request.url.port}"})


async def models(request: Request) -> Response:
    return JSONResponse({"object": "list", "data": [{"id": "base", "object": "model"}]})


def fake_vllm() -> Starlette:
    """The fake upstream's app."""
    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"]), Route("/v1/models", models, methods=["GET"])])


class ThreadServer:
    """An ASGI app served by uvicorn in a thread of this process, on a free loopback port."""

    def __init__(self, app, *, host: str = "127.0.0.1"):
        with socket.socket() as s:
            s.bind((host, 0))
            self.port = s.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=self.port, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "ThreadServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"server on {self.url} did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)
