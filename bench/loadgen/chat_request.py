"""Send one chat completion, streaming or not, and record when its output arrived."""

from __future__ import annotations

import json
import time

import httpx

from bench.loadgen.request_result import RequestResult

CHAT_PATH = "/v1/chat/completions"
_STREAM_HEADERS = (("content-type", "application/json"), ("accept", "text/event-stream"))
_JSON_HEADERS = (("content-type", "application/json"), ("accept", "application/json"))
_CLOSE = (("connection", "close"),)


def chat_body(model: str, messages: list[dict], *, max_tokens: int, ignore_eos: bool, stream: bool = True) -> bytes:
    """A greedy chat request. Streaming (``stream``), it asks for a usage chunk at the end;
    non-streaming, it has ``"stream": false`` and no ``stream_options`` (the response
    carries ``usage`` anyway)."""
    body = {
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": ignore_eos,
        "stream": stream,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    return json.dumps(body).encode()


async def stream_chat(
    client: httpx.AsyncClient, body: bytes, result: RequestResult, *, close_connection: bool = False
) -> None:
    """POST ``body`` to the chat endpoint and record what came back in ``result``.

    The body is read to its end after ``[DONE]`` (as vLLM's benchmark and the async
    ``openai`` client do), so the connection goes back to the pool; with
    ``close_connection`` the request asks the server to close it instead.

    Never raises for HTTP, protocol or server errors: they are recorded (``ok`` stays
    False, ``error`` says why). ``ok`` means: status 200, at least one output chunk, and
    the ``[DONE]`` line. Cancellation: the response is closed and ``Cancelled`` propagates;
    ``result`` keeps what arrived, with ``ok`` False.
    """
    done = False
    try:
        headers = _STREAM_HEADERS + _CLOSE if close_connection else _STREAM_HEADERS
        async with client.stream("POST", CHAT_PATH, content=body, headers=headers) as response:
            result.status = response.status_code
            if response.status_code != 200:
                text = (await response.aread())[:300].decode("utf-8", "replace")
                result.error = f"HTTP {response.status_code}: {text}"
                return
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if done:
                    continue  # nothing follows [DONE]; reading on ends the chunked body
                if data == "[DONE]":
                    done = True
                    continue
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


async def complete_chat(
    client: httpx.AsyncClient, body: bytes, result: RequestResult, *, close_connection: bool = False
) -> None:
    """POST a non-streaming ``body`` to the chat endpoint and record the response in ``result``
    the way vLLM's ``benchmark_serving`` records a request without a stream
    (``close_connection``: with ``Connection: close``).

    The whole response is one "chunk": it arrives when the full body has been read, which
    is both the time to first token and the end (``ttft == e2e``). As in vLLM, TPOT,
    ``(e2e - ttft) / (output_tokens - 1)``, is then 0, and with no gaps between chunks the
    run's ITL figures are vLLM's ``np.mean(itls or 0)``, 0 too (``bench.loadgen.metrics``):
    both are printed as 0, not left out. ``output_tokens`` and ``prompt_tokens`` are the
    response's ``usage.completion_tokens`` and ``usage.prompt_tokens``.

    Never raises for HTTP, protocol or server errors: they are recorded (``ok`` stays False,
    ``error`` says why). ``ok`` means: status 200, a choice with a ``message``, and
    ``usage``. Cancellation: the request is abandoned and ``Cancelled`` propagates;
    ``result`` has ``ok`` False and no chunk.
    """
    try:
        headers = _JSON_HEADERS + _CLOSE if close_connection else _JSON_HEADERS
        response = await client.post(CHAT_PATH, content=body, headers=headers)
    except httpx.HTTPError as exc:
        result.error = f"{type(exc).__name__}: {exc}"[:300]
        return
    finally:
        result.ended = time.perf_counter()  # the whole body has arrived (or the request failed)
    result.status = response.status_code
    if response.status_code != 200:
        result.error = f"HTTP {response.status_code}: {response.content[:300].decode('utf-8', 'replace')}"
        return
    try:
        payload = response.json()
    except ValueError as exc:
        result.error = f"{type(exc).__name__}: {exc}"[:300]
        return
    choices = payload.get("choices") if isinstance(payload, dict) else None
    usage = payload.get("usage") if isinstance(payload, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance((choices[0] or {}).get("message"), dict):
        result.error = f"response without a message: {response.text[:250]}"
        return
    if not isinstance(usage, dict):
        result.error = f"response without usage: {response.text[:250]}"
        return
    result.output_tokens = int(usage.get("completion_tokens") or 0)
    result.prompt_tokens = int(usage.get("prompt_tokens") or 0)
    result.chunk_times.append(result.ended)
    result.ok = True


async def first_model_id(client: httpx.AsyncClient) -> str:
    """The first model id ``GET /v1/models`` lists. Raises ``httpx.HTTPError`` on failure.

    Cancellation: safe; the request is abandoned.
    """
    response = await client.get("/v1/models")
    response.raise_for_status()
    return response.json()["data"][0]["id"]
