"""The event loop's cost per streamed token on vlserve's SSE path, without HTTP or a model,
and how long one scheduler pass gets while a step's outputs fan out.

A stand-in step loop (a ``Core``) gives every running sequence one token per step and
hands the ``StepOutputs`` to the real ``AsyncEngine`` (its ``StreamRegistry``,
``RequestStream``s and ``OutputFanout``), the real ``produce_chunks`` + ``ChatChunker``
format the chunks, the real ``sse_response`` body carries them, sent by the server's own
``send_body`` (inline for one choice) into a write that does not yield, as the server's
socket write does when the socket buffer takes it whole (``server.http_path.connection``).
Steps are ``--step-ms`` apart in trio's mock time (autojump), so the task interleaving is
that of a real server whose engine steps take that long, and the figures are deterministic apart from CPU time:

- CPU µs per token / per event / per write: the loop thread's CPU time (``time.thread_time``)
  over the whole run, divided by tokens streamed, ``data:`` events and body writes;
- writes per step and task steps per token: how many sends reach the transport, and how
  many task steps the loop runs for each token (scheduler work, see bench/README.md);
- task steps per pass (p50 / p99 / max) and CPU ms per pass (p99 / max): a probe that
  arrives during a pass waits for it, so these bound what the fan-out adds to /health.

    python -m bench.sse_cost [--streams 128] [--tokens 64] [--step-ms 30] [--fanout 16,128]

Run it on a quiet machine for CPU figures to compare; on a shared one only the counts hold.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio
import trio.testing

from engine.async_engine import AsyncEngine
from engine.config import EngineConfig
from engine.core_messages import SequenceOutput, StepOutputs
from engine.outbox import Outbox
from engine.prompt import EnginePrompt
from engine.sampling_params import SamplingParams
from engine.statistics import IDLE_STATISTICS
from server.chat_format import ChatChunker
from server.generation import make_jobs
from server.response_meta import ResponseMeta
from server.sse import send_body, sse_response
from server.streaming import produce_chunks

PIECE = " token"


class SteppingCore:
    """A ``Core`` whose step, every ``step_s`` of mock time, gives each running sequence one
    token until its ``max_tokens``."""

    max_model_len = 4096
    supports_images = False
    stopped_reason = "the stand-in step loop stopped"

    def __init__(self, step_s: float) -> None:
        self._step_s = step_s
        self.steps = 0

    async def run(self, outbox: Outbox, deliver: Callable[[StepOutputs], None]) -> None:
        remaining: dict[int, int] = {}
        while True:
            if not remaining:
                await outbox.wait()
            submit = outbox.take()
            for new in submit.adds:
                remaining[new.seq_id] = new.params.max_tokens
            for seq_id in submit.aborts:
                remaining.pop(seq_id, None)
            await trio.sleep(self._step_s)
            self.steps += 1
            updates = []
            for seq_id, left in list(remaining.items()):
                finish = "length" if left == 1 else None
                updates.append(SequenceOutput(seq_id, [left], PIECE, None, finish))
                if finish:
                    del remaining[seq_id]
                else:
                    remaining[seq_id] = left - 1
            deliver(StepOutputs(updates, IDLE_STATISTICS))


class PassMeter(trio.abc.Instrument):
    """Task steps and thread CPU time of every scheduler pass (from one I/O wait to the next)."""

    def __init__(self) -> None:
        self.task_steps = 0
        self.pass_steps: list[int] = []
        self.pass_cpu: list[float] = []
        self._steps = 0
        self._started = time.thread_time()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        self.task_steps += 1
        self._steps += 1

    def before_io_wait(self, timeout: float) -> None:
        if self._steps:
            self.pass_steps.append(self._steps)
            self.pass_cpu.append(time.thread_time() - self._started)

    def after_io_wait(self, timeout: float) -> None:
        self._steps = 0
        self._started = time.thread_time()


@dataclass
class Sink:
    """Quart's send loop for one response, writing into nothing."""

    writes: int = 0
    bytes: int = 0
    events: int = 0

    async def drain(self, response: Any) -> None:
        async def write(data: bytes) -> None:
            self.writes += 1
            self.bytes += len(data)
            self.events += data.count(b"\n\n")

        await send_body(response.response, write)


async def stream_all(streams: int, tokens: int, n: int, step_s: float, fanout: int) -> dict[str, Any]:
    core = SteppingCore(step_s)
    sinks = [Sink() for _ in range(streams)]
    params = [SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)] * n
    async with AsyncEngine.open(core, EngineConfig.stream_interval, fanout_per_pass=fanout) as engine:
        async with trio.open_nursery() as requests:
            for i, sink in enumerate(sinks):
                jobs = make_jobs([EnginePrompt(token_ids=[1, 2, 3])], [params])
                chunker = ChatChunker(ResponseMeta.new("chatcmpl", "bench"), include_usage=True, logprobs=False)

                async def producer(send, jobs=jobs, chunker=chunker) -> None:
                    await produce_chunks(engine, jobs, chunker, True, send)

                requests.start_soon(sink.drain, sse_response(producer, f"req-{i}", inline=n == 1))
    return {
        "steps": core.steps,
        "writes": sum(s.writes for s in sinks),
        "events": sum(s.events for s in sinks),
        "bytes": sum(s.bytes for s in sinks),
    }


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def measure(streams: int, tokens: int, n: int, step_s: float, fanout: int) -> dict[str, Any]:
    meter = PassMeter()
    clock = trio.testing.MockClock(autojump_threshold=0)
    started = time.thread_time()
    counts = trio.run(stream_all, streams, tokens, n, step_s, fanout, clock=clock, instruments=[meter])
    cpu = time.thread_time() - started
    total_tokens = streams * n * tokens
    return {
        **counts,
        "fanout": fanout,
        "tokens": total_tokens,
        "task_steps": meter.task_steps,
        "cpu_s": round(cpu, 4),
        "cpu_us_per_token": round(cpu * 1e6 / total_tokens, 2),
        "cpu_us_per_event": round(cpu * 1e6 / counts["events"], 2),
        "cpu_us_per_write": round(cpu * 1e6 / counts["writes"], 2),
        "writes_per_step_per_stream": round(counts["writes"] / (counts["steps"] * streams), 3),
        "task_steps_per_token": round(meter.task_steps / total_tokens, 2),
        "pass_steps_p50": _quantile(meter.pass_steps, 0.5),
        "pass_steps_p99": _quantile(meter.pass_steps, 0.99),
        "pass_steps_max": max(meter.pass_steps, default=0),
        "pass_cpu_ms_p99": round(_quantile(meter.pass_cpu, 0.99) * 1e3, 2),
        "pass_cpu_ms_max": round(max(meter.pass_cpu, default=0.0) * 1e3, 2),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=128, help="concurrent streamed requests")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per choice")
    parser.add_argument("--n", type=int, default=1, help="choices per request")
    parser.add_argument("--step-ms", type=float, default=30.0, help="engine step length (mock time)")
    parser.add_argument(
        "--fanout",
        default=f"{EngineConfig.stream_fanout},1000000",
        help="comma-separated --stream-fanout values to compare (a huge one: every stream in one pass)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="runs per setting; the lowest CPU is printed")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON lines")
    args = parser.parse_args(argv)
    for fanout in (int(part) for part in args.fanout.split(",")):
        runs = [measure(args.streams, args.tokens, args.n, args.step_ms / 1000, fanout) for _ in range(args.repeats)]
        best = min(runs, key=lambda r: r["cpu_s"])
        if args.json:
            print(json.dumps(best))
            continue
        print(
            f"fanout {fanout}: {best['tokens']} tokens in {args.streams} streams x {args.n} choices: "
            f"{best['cpu_us_per_token']} µs CPU per token, {best['cpu_us_per_write']} per write; "
            f"{best['writes_per_step_per_stream']} writes per stream per step, "
            f"{best['task_steps_per_token']} task steps per token; task steps per pass p50 / p99 / max "
            f"{best['pass_steps_p50']} / {best['pass_steps_p99']} / {best['pass_steps_max']}, "
            f"CPU ms per pass p99 / max {best['pass_cpu_ms_p99']} / {best['pass_cpu_ms_max']}"
        )


if __name__ == "__main__":
    main()
