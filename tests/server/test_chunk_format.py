"""Streamed chunks are plain dicts encoded with orjson: byte for byte what the schema
models (``ChatCompletionChunk``, ``CompletionChunk``) would send."""

from __future__ import annotations

import orjson
import pytest

from engine.outputs import StreamDelta, TokenLogprob, TopLogprob
from server.chat_format import ChatChunker
from server.completion_format import CompletionChunker
from server.response_meta import ResponseMeta
from server.schemas.chat import ChatCompletionChunk
from server.schemas.common import Usage
from server.schemas.completions import CompletionChunk
from server.sse import encode_event

META = ResponseMeta(id="chatcmpl-abc", created=1700000000, model="m")
LOGPROBS = [
    TokenLogprob(
        token_id=7,
        token="é",
        logprob=-0.25,
        top=[TopLogprob(1, "a", float("-inf")), TopLogprob(2, "b", float("nan"))],
    )
]
DELTAS = [
    StreamDelta("Hel", [1], LOGPROBS, None, 3, 1),
    StreamDelta("", [], None, "stop", 3, 1),
    StreamDelta('lo "wörld"\n', [2, 3], LOGPROBS, "length", 3, 3),
]
USAGE = Usage(prompt_tokens=3, completion_tokens=3, total_tokens=6)


def chunks_of(chunker, include_usage: bool) -> list[dict]:
    out = list(chunker.start(2))
    for delta in DELTAS:
        out.extend(chunker.for_delta(2, delta))
    if include_usage:
        out.append(chunker.usage(USAGE))
    return out


@pytest.mark.parametrize("include_usage", [False, True])
@pytest.mark.parametrize("logprobs", [False, True])
def test_chat_chunks_match_the_schema_bytes(include_usage, logprobs):
    chunks = chunks_of(ChatChunker(META, include_usage=include_usage, logprobs=logprobs), include_usage)
    assert len(chunks) == 1 + 4 + include_usage
    for chunk in chunks:
        model = ChatCompletionChunk.model_validate(chunk)
        assert orjson.dumps(chunk) == model.model_dump_json().encode()
        assert encode_event(chunk) == encode_event(model)


@pytest.mark.parametrize("include_usage", [False, True])
@pytest.mark.parametrize("logprobs", [False, True])
def test_completion_chunks_match_the_schema_bytes(include_usage, logprobs):
    chunks = chunks_of(CompletionChunker(META, include_usage=include_usage, logprobs=logprobs), include_usage)
    assert len(chunks) == 3 + include_usage
    for chunk in chunks:
        model = CompletionChunk.model_validate(chunk)
        assert orjson.dumps(chunk) == model.model_dump_json().encode()


def test_usage_chunk_and_done_are_unchanged():
    usage = ChatChunker(META, include_usage=True, logprobs=False).usage(USAGE)
    assert encode_event(usage) == (
        b'data: {"id":"chatcmpl-abc","object":"chat.completion.chunk","created":1700000000,'
        b'"model":"m","choices":[],"system_fingerprint":null,'
        b'"usage":{"prompt_tokens":3,"completion_tokens":3,"total_tokens":6}}\n\n'
    )
