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
from server.schemas.chat import ChatChoice, ChatCompletion, ChatMessageOut
from server.schemas.common import Usage
from server.streaming import Chunk, ChunkEnvelope


def chat_completion(
    meta: ResponseMeta, results: Sequence[ChoiceResult], usage: Usage, *, logprobs: bool
) -> ChatCompletion:
    return ChatCompletion(
        id=meta.id,
        created=meta.created,
        model=meta.model,
        choices=[
            ChatChoice(
                index=result.index,
                message=ChatMessageOut(content=result.text),
                logprobs=chat_logprobs(result.logprobs or []) if logprobs else None,
                finish_reason=result.finish_reason,
            )
            for result in results
        ],
        usage=usage,
    )


class ChatChunker:
    """Makes the chunks of one streamed chat completion.

    Per choice: a role chunk first, then content chunks, then a chunk with an empty delta
    and the finish reason. With ``include_usage`` every chunk carries ``"usage": null``
    and a last chunk with no choices carries the usage.
    """

    def __init__(self, meta: ResponseMeta, *, include_usage: bool, logprobs: bool) -> None:
        self._envelope = ChunkEnvelope(meta, "chat.completion.chunk", include_usage=include_usage)
        self._logprobs = logprobs

    def start(self, index: int) -> list[Chunk]:
        """The role chunk that opens choice ``index``."""
        delta = {"role": "assistant", "content": ""}
        return [self._envelope.chunk([_choice(index, delta, None, None)])]

    def for_delta(self, index: int, delta: StreamDelta) -> list[Chunk]:
        """The chunks for one engine delta: content (if any), then finish (if last)."""
        chunks = []
        has_logprobs = self._logprobs and bool(delta.logprobs)
        if delta.text or has_logprobs:
            logprobs = chat_logprobs_payload(delta.logprobs or []) if has_logprobs else None
            chunks.append(self._envelope.chunk([_choice(index, {"content": delta.text}, logprobs, None)]))
        if delta.finish_reason is not None:
            chunks.append(self._envelope.chunk([_choice(index, {}, None, delta.finish_reason)]))
        return chunks

    def usage(self, usage: Usage) -> Chunk:
        return self._envelope.usage(usage)


def _choice(index: int, delta: Chunk, logprobs: Chunk | None, finish_reason: str | None) -> Chunk:
    return {
        "index": index,
        "delta": delta,
        "logprobs": logprobs,
        "finish_reason": finish_reason,
    }
