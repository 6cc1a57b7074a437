"""Engine results and deltas as ``chat.completion`` and ``chat.completion.chunk`` objects.

Whole responses are schema models. Streamed chunks are plain dicts with the keys, order
and values ``ChatCompletionChunk.model_dump_json`` would give (tests/server/test_chunk_format.py
checks it), because a chunk per token through pydantic costs the event loop more than
the rest of the chunk's way to the socket (bench/sse_cost.py).
"""

from __future__ import annotations

from collections.abc import Sequence

from engine.outputs import StreamDelta
from server.generation import ChoiceResult
from server.logprobs import chat_logprobs, chat_logprobs_payload
from server.response_meta import ResponseMeta
from server.schemas.chat import ChatChoice, ChatCompletion, ChatMessageOut, ToolCallOut
from server.schemas.common import Usage
from server.streaming import Chunk, ChunkEnvelope
from server.tool_calls import ArgumentsFragment, CallStart, Event, ToolMode, ToolStream

NO_TOOLS = ToolMode()


def chat_completion(
    meta: ResponseMeta, results: Sequence[ChoiceResult], usage: Usage, *, logprobs: bool, tools: ToolMode = NO_TOOLS
) -> ChatCompletion:
    """The whole response; each choice's text is read as ``tools`` says (``server.tool_calls``)."""
    choices = []
    for result in results:
        content, calls, finish_reason = tools.parse(result.text, result.finish_reason)
        message = ChatMessageOut(content=content, tool_calls=[ToolCallOut(**c.out()) for c in calls] or None)
        choices.append(
            ChatChoice(
                index=result.index,
                message=message,
                logprobs=chat_logprobs(result.logprobs or []) if logprobs else None,
                finish_reason=finish_reason,
            )
        )
    return ChatCompletion(id=meta.id, created=meta.created, model=meta.model, choices=choices, usage=usage)


class ChatChunker:
    """Makes the chunks of one streamed chat completion.

    Per choice: a role chunk first, then content chunks, then a chunk with an empty delta
    and the finish reason. With ``include_usage`` every chunk carries ``"usage": null``
    and a last chunk with no choices carries the usage.

    With tools (``server.tool_calls``), each call is sent as OpenAI does: a ``tool_calls``
    delta with its ``index``, ``id``, ``type`` and ``function.name`` (arguments ``""``),
    then deltas of ``function.arguments`` fragments. A ``named`` call sends its head in
    the first content delta and its arguments as the model writes them; an ``auto`` call
    its head once the model has written the name, then its arguments as they come
    (``server.tool_calls``); ``required`` calls once the model has written them all.
    """

    def __init__(self, meta: ResponseMeta, *, include_usage: bool, logprobs: bool, tools: ToolMode = NO_TOOLS) -> None:
        self._envelope = ChunkEnvelope(meta, "chat.completion.chunk", include_usage=include_usage)
        self._logprobs = logprobs
        self._tools = tools
        self._streams: dict[int, ToolStream] = {}
        self._call_counts: dict[int, int] = {}

    def start(self, index: int) -> list[Chunk]:
        """The role chunk that opens choice ``index``."""
        delta = {"role": "assistant", "content": ""}
        return [self._envelope.chunk([_choice(index, delta, None, None)])]

    def for_delta(self, index: int, delta: StreamDelta) -> list[Chunk]:
        """The chunks for one engine delta: content (if any), then finish (if last)."""
        if self._tools.mode != "none":
            return self._tool_chunks(index, delta)
        chunks = []
        has_logprobs = self._logprobs and bool(delta.logprobs)
        if delta.text or has_logprobs:
            logprobs = chat_logprobs_payload(delta.logprobs or []) if has_logprobs else None
            chunks.append(self._envelope.chunk([_choice(index, {"content": delta.text}, logprobs, None)]))
        if delta.finish_reason is not None:
            chunks.append(self._envelope.chunk([_choice(index, {}, None, delta.finish_reason)]))
        return chunks

    def _tool_chunks(self, index: int, delta: StreamDelta) -> list[Chunk]:
        stream = self._streams.setdefault(index, ToolStream(self._tools, fragments=True))
        deltas: list[Chunk] = []
        if self._tools.mode == "named":
            if index not in self._call_counts:
                self._call_counts[index] = 1
                deltas.append(_call_head(0, stream.named_id, self._tools.function or ""))
            if delta.text:
                deltas.append(_call_arguments(0, delta.text))
        else:
            events = stream.feed(delta.text)
            if delta.finish_reason is not None:
                events += stream.finish()
            for event in events:
                deltas.extend(self._event_deltas(index, event))
        chunks = [self._envelope.chunk([_choice(index, d, None, None)]) for d in deltas]
        if delta.finish_reason is not None:
            finish = stream.finish_reason(delta.finish_reason)
            chunks.append(self._envelope.chunk([_choice(index, {}, None, finish)]))
        return chunks

    def _event_deltas(self, index: int, event: Event) -> list[Chunk]:
        if isinstance(event, str):
            return [{"content": event}] if event else []
        if isinstance(event, ArgumentsFragment):
            return [_call_arguments(self._call_counts[index] - 1, event.text)]
        position = self._call_counts.get(index, 0)
        self._call_counts[index] = position + 1
        if isinstance(event, CallStart):
            return [_call_head(position, event.id, event.name)]
        return [_call_head(position, event.id, event.name), _call_arguments(position, event.arguments)]

    def usage(self, usage: Usage) -> Chunk:
        return self._envelope.usage(usage)


def _call_head(position: int, call_id: str, name: str) -> Chunk:
    return {
        "tool_calls": [
            {"index": position, "id": call_id, "type": "function", "function": {"name": name, "arguments": ""}}
        ]
    }


def _call_arguments(position: int, fragment: str) -> Chunk:
    return {"tool_calls": [{"index": position, "function": {"arguments": fragment}}]}


def _choice(index: int, delta: Chunk, logprobs: Chunk | None, finish_reason: str | None) -> Chunk:
    return {
        "index": index,
        "delta": delta,
        "logprobs": logprobs,
        "finish_reason": finish_reason,
    }
