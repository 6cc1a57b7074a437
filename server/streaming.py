"""The producer of a streamed completion: engine deltas in, formatted chunks out."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

from engine.interface import Engine
from engine.outputs import StreamDelta
from server.generation import Job, UsageTally, stream_jobs
from server.response_meta import ResponseMeta
from server.schemas.common import Usage
from server.sse import EventWriter

if TYPE_CHECKING:
    from server.request_metrics import RequestRecord

Chunk = dict[str, Any]


class ChunkEnvelope:
    """What every chunk of one streamed response repeats around its choices: ``id``,
    ``object``, ``created``, ``model`` and ``system_fingerprint``, plus ``"usage": null``
    when usage was asked for (the last chunk, with no choices, carries it). The keys come
    in the order the schema models' ``model_dump_json`` gives them."""

    def __init__(self, meta: ResponseMeta, object_name: str, *, include_usage: bool) -> None:
        self._head = {"id": meta.id, "object": object_name, "created": meta.created, "model": meta.model}
        self._include_usage = include_usage

    def chunk(self, choices: list[Chunk]) -> Chunk:
        chunk = {**self._head, "choices": choices, "system_fingerprint": None}
        if self._include_usage:
            chunk["usage"] = None
        return chunk

    def usage(self, usage: Usage) -> Chunk:
        return {**self._head, "choices": [], "system_fingerprint": None, "usage": usage.model_dump()}


class Chunker(Protocol):
    """Formats one response's chunks (chat or legacy completions) as JSON-ready dicts."""

    def start(self, index: int) -> list[Chunk]: ...

    def for_delta(self, index: int, delta: StreamDelta) -> list[Chunk]: ...

    def usage(self, usage: Usage) -> Chunk: ...


async def produce_chunks(
    engine: Engine,
    jobs: Sequence[Job],
    chunker: Chunker,
    include_usage: bool,
    out: EventWriter,
    *,
    record: RequestRecord | None = None,
) -> None:
    """Send each choice's start chunks, then chunks as deltas arrive, then the usage chunk
    if asked for, through ``out`` (``server.sse``): the start chunks are flushed together,
    then each delta's chunks; a choice's last delta waits for the usage chunk and
    ``[DONE]``, so they all leave in one write. ``record``: as ``stream_jobs``.
    Cancellation: every sequence still running is aborted."""
    tally = UsageTally()
    for job in jobs:
        for chunk in chunker.start(job.index):
            await out.send(chunk)
    await out.flush()

    async def on_delta(job: Job, delta: StreamDelta) -> None:
        tally.add(job, delta)
        for chunk in chunker.for_delta(job.index, delta):
            await out.send(chunk)
        if delta.finish_reason is None:
            await out.flush()

    await stream_jobs(engine, jobs, on_delta, record)
    if include_usage:
        await out.send(chunker.usage(tally.usage()))
