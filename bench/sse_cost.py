"""The event loop's cost per streamed token on vlserve's SSE path, without HTTP or a model.

A stand-in engine pushes one token per step into real ``RequestStream``s (as both engine
placements do), the real ``produce_chunks`` + ``ChatChunker`` format the chunks, the real
``sse_response`` body carries them, and a stand-in for Quart's send loop (``async with
body: async for data in body: await send(data)``, one checkpoint per send as a socket
write has) consumes them. Steps are ``--step-ms`` apart in trio's mock time (autojump), so
the task interleaving is that of a real server whose engine steps take that long, and the
figures are deterministic apart from CPU time:

- CPU µs per token / per event / per write: the loop thread's CPU time (``time.thread_time``)
  over the whole run, divided by tokens streamed, ``data:`` events and body writes;
- writes per step and task steps per token: how many sends reach the transport, and how
  many task steps the loop runs for each token (scheduler work, see bench/README.md).

    python -m bench.sse_cost [--streams 64] [--tokens 256] [--n 1] [--step-ms 10]

Run it on a quiet machine for figures to compare; on a shared one only the counts hold.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import trio
import trio.testing

from engine.prompt import EnginePrompt
from engine.request_stream import RequestStream
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence
from server.chat_format import ChatChunker
from server.generation import make_jobs
from server.response_meta import ResponseMeta
from server.sse import sse_response
from server.streaming import produce_chunks

PIECE = " token"


@dataclass
class _Update:
    """What ``RequestStream.push`` reads of an engine ``SequenceUpdate``."""

    token_ids: list[int]
    text: str
    logprobs: None
    finish_reason: str | None


class SteppingEngine:
    """Every ``step_s`` (mock time) gives each open stream one token until its ``max_tokens``."""

    def __init__(self, step_s: float) -> None:
        self._step_s = step_s
        self._streams: dict[int, RequestStream] = {}
        self._next_id = 0
        self.steps = 0

    @asynccontextmanager
    async def open_stream(self, prompt: EnginePrompt, params: SamplingParams) -> AsyncIterator[RequestStream]:
        seq = Sequence(self._next_id, prompt, params)
        self._next_id += 1
        stream = RequestStream(seq)
        self._streams[seq.seq_id] = stream
        try:
            yield stream
        finally:
            self._streams.pop(seq.seq_id, None)

    async def run(self) -> None:
        while True:
            await trio.sleep(self._step_s)
            if not self._streams:
                continue
            self.steps += 1
            for stream in list(self._streams.values()):
                seq = stream.seq
                seq.output_ids.append(len(seq.output_ids))
                last = len(seq.output_ids) >= seq.params.max_tokens
                stream.push(_Update([len(seq.output_ids)], PIECE, None, "length" if last else None))


class StepCounter(trio.abc.Instrument):
    def __init__(self) -> None:
        self.task_steps = 0

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        self.task_steps += 1


@dataclass
class Sink:
    """Quart's send loop for one response, writing into nothing."""

    writes: int = 0
    bytes: int = 0
    events: int = 0

    async def drain(self, response: Any) -> None:
        async with response.response as body:
            async for data in body:
                self.writes += 1
                self.bytes += len(data)
                self.events += data.count(b"\n\n")
                await trio.lowlevel.checkpoint()  # a socket write's checkpoint


async def stream_all(streams: int, tokens: int, n: int, step_s: float) -> dict[str, Any]:
    engine = SteppingEngine(step_s)
    sinks = [Sink() for _ in range(streams)]
    params = [SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)] * n
    async with trio.open_nursery() as nursery:
        nursery.start_soon(engine.run)
        async with trio.open_nursery() as requests:
            for i, sink in enumerate(sinks):
                jobs = make_jobs([EnginePrompt(token_ids=[1, 2, 3])], [params])
                chunker = ChatChunker(
                    ResponseMeta.new("chatcmpl", "bench"),
                    include_usage=True,
                    logprobs=False,
                )

                async def producer(send, jobs=jobs, chunker=chunker) -> None:
                    await produce_chunks(engine, jobs, chunker, True, send)

                requests.start_soon(sink.drain, sse_response(producer, f"req-{i}"))
        nursery.cancel_scope.cancel()
    return {
        "steps": engine.steps,
        "writes": sum(s.writes for s in sinks),
        "events": sum(s.events for s in sinks),
        "bytes": sum(s.bytes for s in sinks),
    }


def measure(streams: int, tokens: int, n: int, step_s: float) -> dict[str, Any]:
    counter = StepCounter()
    clock = trio.testing.MockClock(autojump_threshold=0)
    started = time.thread_time()
    counts = trio.run(stream_all, streams, tokens, n, step_s, clock=clock, instruments=[counter])
    cpu = time.thread_time() - started
    total_tokens = streams * n * tokens
    return {
        **counts,
        "tokens": total_tokens,
        "task_steps": counter.task_steps,
        "cpu_s": round(cpu, 4),
        "cpu_us_per_token": round(cpu * 1e6 / total_tokens, 2),
        "cpu_us_per_event": round(cpu * 1e6 / counts["events"], 2),
        "cpu_us_per_write": round(cpu * 1e6 / counts["writes"], 2),
        "writes_per_step_per_stream": round(counts["writes"] / (counts["steps"] * streams), 3),
        "task_steps_per_token": round(counter.task_steps / total_tokens, 2),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=64, help="concurrent streamed requests")
    parser.add_argument("--tokens", type=int, default=256, help="tokens per choice")
    parser.add_argument("--n", type=int, default=1, help="choices per request")
    parser.add_argument("--step-ms", type=float, default=10.0, help="engine step length (mock time)")
    parser.add_argument("--repeats", type=int, default=3, help="runs; the lowest CPU is printed")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    runs = [measure(args.streams, args.tokens, args.n, args.step_ms / 1000) for _ in range(args.repeats)]
    best = min(runs, key=lambda r: r["cpu_s"])
    if args.json:
        print(json.dumps(best))
        return
    print(
        f"{best['tokens']} tokens in {args.streams} streams x {args.n} choices: "
        f"{best['cpu_us_per_token']} µs CPU per token, {best['cpu_us_per_event']} per event, "
        f"{best['cpu_us_per_write']} per write; {best['events']} events, {best['writes']} writes "
        f"({best['writes_per_step_per_stream']} per stream per step), "
        f"{best['task_steps_per_token']} task steps per token"
    )


if __name__ == "__main__":
    main()
