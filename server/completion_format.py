"""Engine results and deltas as legacy ``text_completion`` objects (whole and streamed).

Streamed chunks are plain dicts shaped as ``CompletionChunk.model_dump_json`` would shape
them (see ``server.chat_format`` for why).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType

from engine.outputs import StreamDelta
from server.generation import ChoiceResult
from server.logprobs import completion_logprobs, completion_logprobs_payload
from server.response_meta import ResponseMeta
from server.schemas.common import Usage
from server.schemas.completions import Completion, CompletionChoice
from server.streaming import Chunk, ChunkEnvelope


def completion(
    meta: ResponseMeta,
    results: Sequence[ChoiceResult],
    usage: Usage,
    *,
    logprobs: bool,
    echo: Mapping[int, str] = MappingProxyType({}),
) -> Completion:
    """The whole response; ``echo`` maps a choice's index to the prompt text it starts with."""
    return Completion(
        id=meta.id,
        created=meta.created,
        model=meta.model,
        choices=[
            CompletionChoice(
                index=result.index,
                text=echo.get(result.index, "") + result.text,
                logprobs=completion_logprobs(result.logprobs or []) if logprobs else None,
                finish_reason=result.finish_reason,
            )
            for result in results
        ],
        usage=usage,
    )


class CompletionChunker:
    """Makes the chunks of one streamed completion: one per delta with text, logprobs or a
    finish reason; with ``include_usage`` a last chunk with no choices carries the usage.
    ``echo`` maps a choice's index to the prompt text its first chunk carries."""

    def __init__(
        self,
        meta: ResponseMeta,
        *,
        include_usage: bool,
        logprobs: bool,
        echo: Mapping[int, str] = MappingProxyType({}),
    ) -> None:
        self._envelope = ChunkEnvelope(meta, "text_completion", include_usage=include_usage)
        self._logprobs = logprobs
        self._echo = echo
        self._text_offsets: dict[int, int] = {}

    def start(self, index: int) -> list[Chunk]:
        """Legacy completions open a choice with nothing, or with the echoed prompt."""
        text = self._echo.get(index)
        if not text:
            return []
        self._text_offsets[index] = len(text)
        return [self._envelope.chunk([{"index": index, "text": text, "logprobs": None, "finish_reason": None}])]

    def for_delta(self, index: int, delta: StreamDelta) -> list[Chunk]:
        has_logprobs = self._logprobs and bool(delta.logprobs)
        if not (delta.text or has_logprobs or delta.finish_reason is not None):
            return []
        offset = self._text_offsets.get(index, 0)
        self._text_offsets[index] = offset + len(delta.text)
        choice = {
            "index": index,
            "text": delta.text,
            "logprobs": completion_logprobs_payload(delta.logprobs or [], offset) if has_logprobs else None,
            "finish_reason": delta.finish_reason,
        }
        return [self._envelope.chunk([choice])]

    def usage(self, usage: Usage) -> Chunk:
        return self._envelope.usage(usage)
