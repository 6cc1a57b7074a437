"""Run every server on every workload and concurrency level, one server process at a time.

Each server is started once (fresh process, so no cache carries over from another server),
then runs the workloads and levels in order; every (workload, level) pair uses its own
range of request indices, so every image is new to the server. The image server, when a
workload needs it, runs for the whole benchmark.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path

import httpx
import trio

from bench.launch.servers import running_image_server, running_server
from bench.loadgen.metrics import Summary, summarise
from bench.loadgen.options import LoadOptions
from bench.loadgen.run import LoadRun, run_load
from bench.loadgen.sse_request import chat_body, first_model_id
from bench.workloads.catalog import Workload, uses_image_server, uses_images
from bench.workloads.image_store import ImageStore


@dataclass(frozen=True)
class BenchmarkPlan:
    servers: tuple[str, ...]
    workloads: tuple[str, ...]
    concurrency_levels: tuple[int, ...]
    options: LoadOptions
    image_dir: Path
    log_dir: Path
    image_size: int = 1024
    image_latency: float = 0.05
    model: str | None = None
    first_index: int = 0
    extra_server_args: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def stride(self) -> int:
        return self.options.warmup + self.options.num_requests

    def indices(self, workload: str, level: int) -> tuple[list[int], list[int]]:
        """Warm-up and measured request indices of one (workload, level) pair."""
        slot = self.workloads.index(workload) * len(self.concurrency_levels) + self.concurrency_levels.index(level)
        start = self.first_index + slot * self.stride
        warm = list(range(start, start + self.options.warmup))
        return warm, list(range(start + self.options.warmup, start + self.stride))

    def all_image_indices(self) -> range:
        slots = sum(uses_images(w) for w in self.workloads) and len(self.workloads) * len(self.concurrency_levels)
        return range(self.first_index, self.first_index + slots * self.stride)


Progress = Callable[[LoadRun, Summary], None]


async def run_benchmark(plan: BenchmarkPlan, progress: Progress | None = None) -> list[tuple[LoadRun, Summary]]:
    """Run the whole plan; return every run with its summary, in the order they ran.

    Cancellation: the server, image server and probe processes in use are stopped (by PID)
    before ``Cancelled`` propagates.
    """
    store = ImageStore(plan.image_dir, plan.image_size)
    if any(uses_images(w) for w in plan.workloads):
        await trio.to_thread.run_sync(store.ensure, plan.all_image_indices())
    out: list[tuple[LoadRun, Summary]] = []
    async with AsyncExitStack() as stack:
        image_url = None
        if any(uses_image_server(w) for w in plan.workloads):
            image_url = await stack.enter_async_context(
                running_image_server(plan.image_dir, plan.log_dir, latency=plan.image_latency)
            )
        for name in plan.servers:
            async with running_server(name, plan.log_dir, model=plan.model) as server:
                async with httpx.AsyncClient(base_url=server.base_url, timeout=30.0) as client:
                    model_id = await first_model_id(client)
                for workload_name in plan.workloads:
                    workload = Workload(workload_name, store if uses_images(workload_name) else None, image_url)
                    for level in plan.concurrency_levels:
                        run = await _one_run(plan, server, workload, model_id, level)
                        summary = summarise(run)
                        out.append((run, summary))
                        if progress is not None:
                            progress(run, summary)
    return out


async def _one_run(plan: BenchmarkPlan, server, workload: Workload, model_id: str, level: int) -> LoadRun:
    options = replace(plan.options, concurrency=level)
    warm, measured = plan.indices(workload.name, level)

    def body_for(index: int) -> bytes:
        return chat_body(model_id, workload.messages(index), max_tokens=options.max_tokens, ignore_eos=options.ignore_eos)

    return await run_load(
        base_url=server.base_url,
        server=server.name,
        server_pid=server.pid,
        workload=workload.name,
        body_for=body_for,
        kind_of=workload.kind_of,
        warmup_indices=warm,
        indices=measured,
        options=options,
        work_dir=plan.log_dir,
    )


def timestamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")
