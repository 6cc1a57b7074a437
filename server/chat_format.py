"""Engine results and deltas as ``chat.completion`` and ``chat.completion.chunk`` objects."""

from __future__ import annotations

from collections.abc import Sequence

from engine.outputs import StreamDelta
from server.generation import ChoiceResult
from server.logprobs import chat_logprobs
from server.response_meta import ResponseMeta
from server.schemas.chat import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatDelta,
    ChatMessageOut,
)
from server.schemas.common import Usage


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
        self._meta = meta
        self._include_usage = include_usage
        self._logprobs = logprobs

    def _chunk(self, choices: list[ChatChunkChoice]) -> ChatCompletionChunk:
        meta = self._meta
        if self._include_usage:
            return ChatCompletionChunk(
                id=meta.id, created=meta.created, model=meta.model, choices=choices, usage=None
            )
        return ChatCompletionChunk(
            id=meta.id, created=meta.created, model=meta.model, choices=choices
        )

    def start(self, index: int) -> list[ChatCompletionChunk]:
        """The role chunk that opens choice ``index``."""
        delta = ChatDelta(role="assistant", content="")
        return [self._chunk([ChatChunkChoice(index=index, delta=delta)])]

    def for_delta(self, index: int, delta: StreamDelta) -> list[ChatCompletionChunk]:
        """The chunks for one engine delta: content (if any), then finish (if last)."""
        chunks = []
        has_logprobs = self._logprobs and bool(delta.logprobs)
        if delta.text or has_logprobs:
            choice = ChatChunkChoice(
                index=index,
                delta=ChatDelta(content=delta.text),
                logprobs=chat_logprobs(delta.logprobs or []) if has_logprobs else None,
            )
            chunks.append(self._chunk([choice]))
        if delta.finish_reason is not None:
            choice = ChatChunkChoice(
                index=index, delta=ChatDelta(), finish_reason=delta.finish_reason
            )
            chunks.append(self._chunk([choice]))
        return chunks

    def usage(self, usage: Usage) -> ChatCompletionChunk:
        meta = self._meta
        return ChatCompletionChunk(
            id=meta.id, created=meta.created, model=meta.model, choices=[], usage=usage
        )
