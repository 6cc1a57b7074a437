"""Run a request's choices on the engine: to completion, or delta by delta.

Every sequence lives inside ``engine.open_stream``; leaving that block by any route
(client gone, handler cancelled, a sibling choice failing) aborts the sequence in the
engine and frees its cache. Choices of one request run concurrently in a nursery owned by
the call, so nothing outlives it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

import trio

from engine.errors import RequestRejected
from engine.interface import Engine
from engine.outputs import StreamDelta, TokenLogprob
from engine.sampling_params import SamplingParams
from server.errors import invalid_request_from_engine
from server.schemas.common import Usage

if TYPE_CHECKING:
    from engine.prompt import EnginePrompt
    from engine.slot_lease import SlotLease
    from server.request_metrics import RequestRecord


@dataclass(frozen=True)
class Job:
    """One choice: ``index`` in the response, ``prompt_index`` of the prompt it continues."""

    index: int
    prompt_index: int
    prompt: EnginePrompt
    params: SamplingParams
    lease: SlotLease | None = None  # the pixel slots of ``prompt``'s images


@dataclass
class ChoiceResult:
    """A finished choice. ``finish_reason`` is ``"abort"`` if the engine ended it unasked."""

    index: int
    pieces: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str = "abort"

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def add(self, delta: StreamDelta) -> None:
        self.pieces.append(delta.text)
        self.token_ids.extend(delta.token_ids)
        if delta.logprobs is not None:
            if self.logprobs is None:
                self.logprobs = []
            self.logprobs.extend(delta.logprobs)
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason


class UsageTally:
    """Token counts of a request: each prompt counted once, completions of every choice."""

    def __init__(self) -> None:
        self._prompt: dict[int, int] = {}
        self._completion: dict[int, int] = {}

    def add(self, job: Job, delta: StreamDelta) -> None:
        self._prompt[job.prompt_index] = delta.prompt_tokens
        self._completion[job.index] = delta.completion_tokens

    def usage(self) -> Usage:
        prompt = sum(self._prompt.values())
        completion = sum(self._completion.values())
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


OnDelta = Callable[[Job, StreamDelta], Awaitable[None]]


class SequenceFailed(RuntimeError):
    """The engine ended a sequence because of an internal error (a server-side failure)."""


async def stream_job(
    engine: Engine,
    job: Job,
    on_delta: OnDelta,
    submitted: Callable[[], None] = lambda: None,
    *,
    final_only: bool = False,
) -> None:
    """Run one sequence, awaiting ``on_delta`` for each delta (a slow callback makes the
    engine coalesce deltas rather than queue them; with ``final_only``, one delta, the
    whole output, at the end). ``submitted()`` is called once the engine has the sequence
    (and its own hold on the job's pixel slots).

    Raises ``InvalidRequest`` (naming the request field) if the engine refuses the job,
    ``SequenceFailed`` after the last delta if the engine failed the sequence.
    Cancellation: leaves ``open_stream``, which aborts the sequence.
    """
    try:
        async with engine.open_stream(job.prompt, job.params, job.lease, final_only=final_only) as stream:
            submitted()
            async for delta in stream:
                await on_delta(job, delta)
            if stream.error is not None:
                raise SequenceFailed(f"choice {job.index}: {stream.error}")
    except RequestRejected as error:
        raise invalid_request_from_engine(error) from None


async def stream_jobs(
    engine: Engine,
    jobs: Sequence[Job],
    on_delta: OnDelta,
    record: RequestRecord | None = None,
    *,
    final_only: bool = False,
) -> None:
    """Run all ``jobs`` concurrently (see ``stream_job``, also for ``final_only``); one
    failing cancels the others.

    Deltas of one job arrive in order; deltas of different jobs interleave. Once every job
    is submitted, the request's hold on their pixel slots ends (``SlotLease``): the engine
    holds them until it has read them. ``record`` (if given) is told that the prompts are
    ready and sees every delta first (``server.request_metrics``: no await, no task of its
    own).
    """
    if record is not None:
        record.prompt_ready(jobs)
        on_delta = _recorded(on_delta, record)
    remaining = len(jobs)

    def submitted() -> None:
        nonlocal remaining
        remaining -= 1
        if remaining == 0:
            for lease in {id(job.lease): job.lease for job in jobs if job.lease is not None}.values():
                lease.release_creator()

    if len(jobs) == 1:
        await stream_job(engine, jobs[0], on_delta, submitted, final_only=final_only)
        return
    async with trio.open_nursery() as nursery:
        for job in jobs:
            nursery.start_soon(partial(stream_job, engine, job, on_delta, submitted, final_only=final_only))


def _recorded(on_delta: OnDelta, record: RequestRecord) -> OnDelta:
    async def recorded(job: Job, delta: StreamDelta) -> None:
        record.delta(job, delta)
        await on_delta(job, delta)

    return recorded


async def complete_jobs(
    engine: Engine, jobs: Sequence[Job], record: RequestRecord | None = None
) -> tuple[list[ChoiceResult], Usage]:
    """Run all ``jobs`` to the end; the results in ``index`` order, and the usage.
    ``record``: as ``stream_jobs``. Each choice's stream is final-only: the request's task
    wakes once per choice, when it ends, not at every engine step."""
    results = {job.index: ChoiceResult(index=job.index) for job in jobs}
    tally = UsageTally()

    async def collect(job: Job, delta: StreamDelta) -> None:
        results[job.index].add(delta)
        tally.add(job, delta)

    await stream_jobs(engine, jobs, collect, record, final_only=True)
    return [results[i] for i in sorted(results)], tally.usage()


def make_jobs(
    prompts: Sequence[EnginePrompt],
    params: Sequence[Sequence[SamplingParams]],
    lease: SlotLease | None = None,
) -> list[Job]:
    """Jobs for ``params[p][i]`` (choice ``i`` of prompt ``p``), indexed ``p * n + i``;
    ``lease`` holds the images' pixel slots (a chat has one prompt)."""
    jobs = []
    for prompt_index, (prompt, choice_params) in enumerate(zip(prompts, params, strict=True)):
        for choice, sampling in enumerate(choice_params):
            index = prompt_index * len(choice_params) + choice
            jobs.append(Job(index, prompt_index, prompt, sampling, lease))
    return jobs
