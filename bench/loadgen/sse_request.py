"""Send one streaming chat completion and time its chunks."""

from __future__ import annotations

import json
import time

import httpx

from bench.loadgen.request_result import RequestResult

CHAT_PATH = "/v1/chat/completions"
_HEADERS = (("content-type", "application/json"), ("accept", "text/event-stream"))


def chat_body(model: str, messages: list[dict], *, max_tokens: int, ignore_eos: bool) -> bytes:
    """A streaming, greedy chat request that asks for a usage chunk at the end."""
    return json.dumps(
        {
            "model": model,
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": 0,
            "ignore_eos": ignore_eos,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    ).encode()


async def stream_chat(client: httpx.AsyncClient, body: bytes, result: RequestResult) -> None:
    """POST ``body`` to the chat endpoint and record what came back in ``result``.

    Never raises for HTTP, protocol or server errors: they are recorded (``ok`` stays
    False, ``error`` says why). ``ok`` means: status 200, at least one output chunk, and
    the ``[DONE]`` line. Cancellation: the response is closed and ``Cancelled`` propagates;
    ``result`` keeps what arrived, with ``ok`` False.
    """
    done = False
    try:
        async with client.stream("POST", CHAT_PATH, content=body, headers=_HEADERS) as response:
            result.status = response.status_code
            if response.status_code != 200:
                text = (await response.aread())[:300].decode("utf-8", "replace")
                result.error = f"HTTP {response.status_code}: {text}"
                return
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                _take_chunk(json.loads(data), result, time.perf_counter())
    except (httpx.HTTPError, ValueError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"[:300]
        return
    finally:
        result.ended = time.perf_counter()
    if result.error is None and not result.output_tokens:
        result.output_tokens = len(result.chunk_times)
    if result.error is None:
        result.ok = done and bool(result.chunk_times)
        if not result.ok:
            result.error = "stream ended without output" if done else "stream ended without [DONE]"


def _take_chunk(chunk: dict, result: RequestResult, now: float) -> None:
    if chunk.get("error"):
        result.error = f"error chunk: {json.dumps(chunk['error'])[:250]}"
        return
    usage = chunk.get("usage")
    if usage:
        result.output_tokens = int(usage.get("completion_tokens") or 0)
        result.prompt_tokens = int(usage.get("prompt_tokens") or 0)
    for choice in chunk.get("choices") or ():
        if (choice.get("delta") or {}).get("content"):
            result.chunk_times.append(now)
            return


async def first_model_id(client: httpx.AsyncClient) -> str:
    """The first model id ``GET /v1/models`` lists. Raises ``httpx.HTTPError`` on failure.

    Cancellation: safe; the request is abandoned.
    """
    response = await client.get("/v1/models")
    response.raise_for_status()
    return response.json()["data"][0]["id"]
