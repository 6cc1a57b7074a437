"""The baselines' FastAPI app: ``/health``, ``/v1/models`` and ``/v1/chat/completions``.

Streaming responses send one SSE event per batch of engine updates (``data: {...}``), an
optional usage chunk, then ``data: [DONE]``; a non-streaming request gets one
``chat.completion`` with ``usage``. Input errors become OpenAI-style 400s.
"""

from __future__ import annotations

import json
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response, StreamingResponse

from bench.baselines.asyncio_engine import AsyncioEngine
from bench.baselines.main_style import MainStylePreparer
from bench.baselines.schemas import ChatCompletionRequest
from engine.prompt import EnginePrompt
from engine.sampling_params import SamplingParams
from vl.errors import InvalidRequest


def error_response(exc: InvalidRequest) -> JSONResponse:
    body = {"error": {"message": exc.message, "type": "invalid_request_error", "param": exc.param, "code": exc.code}}
    return JSONResponse(body, status_code=400)


def create_app(engine: AsyncioEngine, preparer: MainStylePreparer, model_name: str) -> FastAPI:
    """The app; its lifespan runs the engine's step loop and shuts down the executors."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            await engine.stop()
            preparer.close()

    app = FastAPI(lifespan=lifespan)
    created = int(time.time())

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200)

    @app.get("/v1/models")
    async def models() -> dict:
        return {
            "object": "list",
            "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "bench"}],
        }

    @app.post("/v1/chat/completions")
    async def chat(request: ChatCompletionRequest):
        try:
            params = request.sampling_params()
            prompt = await preparer.prepare(request.messages)
            engine.check_lengths(prompt, params)
        except InvalidRequest as exc:
            return error_response(exc)
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_name}
        if request.stream:
            return StreamingResponse(
                _sse(engine, prompt, params, meta, request.include_usage), media_type="text/event-stream"
            )
        return JSONResponse(await _complete(engine, prompt, params, meta))

    return app


async def _sse(engine: AsyncioEngine, prompt: EnginePrompt, params: SamplingParams, meta: dict, include_usage: bool):
    """SSE events for one request. Closing the generator (client gone) aborts the sequence."""
    completion_tokens = 0

    def chunk(delta: dict, finish: str | None, usage: Any = None) -> str:
        body = {
            **meta,
            "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
        if include_usage:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    yield chunk({"role": "assistant", "content": ""}, None)
    async with engine.open_stream(prompt, params) as updates:
        async for batch in updates:
            completion_tokens += sum(len(u.token_ids) for u in batch)
            text = "".join(u.text for u in batch)
            finish = batch[-1].finish_reason
            if text or finish:
                yield chunk({"content": text} if text else {}, finish)
    if include_usage:
        usage = {
            "prompt_tokens": len(prompt.token_ids),
            "completion_tokens": completion_tokens,
            "total_tokens": len(prompt.token_ids) + completion_tokens,
        }
        body = {**meta, "object": "chat.completion.chunk", "choices": [], "usage": usage}
        yield f"data: {json.dumps(body)}\n\n"
    yield "data: [DONE]\n\n"


async def _complete(engine: AsyncioEngine, prompt: EnginePrompt, params: SamplingParams, meta: dict) -> dict:
    parts: list[str] = []
    tokens = 0
    finish = None
    async with engine.open_stream(prompt, params) as updates:
        async for batch in updates:
            parts.extend(u.text for u in batch)
            tokens += sum(len(u.token_ids) for u in batch)
            finish = batch[-1].finish_reason
    return {
        **meta,
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(parts)}, "finish_reason": finish}],
        "usage": {
            "prompt_tokens": len(prompt.token_ids),
            "completion_tokens": tokens,
            "total_tokens": len(prompt.token_ids) + tokens,
        },
    }
