"""Run every server on every workload and concurrency level, one server process at a time.

Each server is started once (fresh process, so no cache carries over from another server),
then runs the workloads and levels in order; every (workload, level) pair uses its own
range of request indices, so every image is new to the server. The image server, when a
workload needs it, runs for the whole benchmark. With ``repeats`` > 1 the whole round runs
again with fresh server processes, each round starting with the next server. Before each
run the benchmark can wait (``quiet_wait`` seconds at most) for other processes on the
machine to fall below ``quiet_threshold`` of its CPU.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, replace
from pathlib import Path

import httpx
import trio

from bench.launch.servers import (
    running_image_server,
    running_server,
    source_label,
    vlserve_pixel_slot_args,
    vlserve_variant,
)
from bench.loadgen.chat_request import chat_body, first_model_id
from bench.loadgen.cpu_account import foreign_load_now
from bench.loadgen.loop_lag import scrape_lag_histogram
from bench.loadgen.metrics import Summary, summarise, with_probe_passes
from bench.loadgen.options import LoadOptions
from bench.loadgen.run import LoadRun, run_load
from bench.workloads.catalog import Workload, uses_image_server, uses_images
from bench.workloads.image_store import ImageStore
from bench.workloads.image_tokens import ImageTokenSetting
from server.http_path.probe_passes import PROBE_PASSES_FILE_ENV


@dataclass(frozen=True)
class BenchmarkPlan:
    """``image_tokens``: ``"256"`` or ``"real"`` (``bench.workloads.image_tokens``); with
    ``"real"`` and no ``model``, every server serves the real-size tiny model from the user
    cache (built there on first use); a ``model`` given must be that variant."""

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
    repeats: int = 1
    vlserve_args: tuple[str, ...] = ()
    quiet_threshold: float = 0.15
    quiet_wait: float = 0.0
    image_tokens: str = "256"
    sources: tuple[tuple[str, Path], ...] = ()  # (label, tree) for servers named VARIANT@LABEL

    @property
    def image_setting(self) -> ImageTokenSetting:
        return ImageTokenSetting(self.image_tokens)

    @property
    def stride(self) -> int:
        return self.options.warmup + self.options.num_requests

    @property
    def slots_per_repeat(self) -> int:
        return len(self.workloads) * len(self.concurrency_levels)

    def indices(self, workload: str, level: int, repeat: int = 0) -> tuple[list[int], list[int]]:
        """Warm-up and measured request indices of one (workload, level, repeat)."""
        slot = self.workloads.index(workload) * len(self.concurrency_levels) + self.concurrency_levels.index(level)
        slot += repeat * self.slots_per_repeat
        start = self.first_index + slot * self.stride
        warm = list(range(start, start + self.options.warmup))
        return warm, list(range(start + self.options.warmup, start + self.stride))

    def all_image_indices(self) -> range:
        slots = self.slots_per_repeat * self.repeats if any(uses_images(w) for w in self.workloads) else 0
        return range(self.first_index, self.first_index + slots * self.stride)


Progress = Callable[[LoadRun, Summary], None]


async def run_benchmark(plan: BenchmarkPlan, progress: Progress | None = None) -> list[tuple[LoadRun, Summary]]:
    """Run the whole plan; return every run with its summary, in the order they ran.

    Cancellation: the server, image server and probe processes in use are stopped (by PID)
    before ``Cancelled`` propagates.
    """
    store = ImageStore(plan.image_dir, plan.image_size)
    setting = plan.image_setting
    model = plan.model
    if model is None and setting.name != "256":
        model = str(await trio.to_thread.run_sync(setting.ensure_model))
    # the user's --vlserve-args come last, so they win over the setting's slot size
    vlserve_extra = vlserve_pixel_slot_args(setting.pixel_slot_mb(plan.image_size)) + tuple(plan.vlserve_args)
    if any(uses_images(w) for w in plan.workloads):
        await trio.to_thread.run_sync(store.ensure, plan.all_image_indices())
    out: list[tuple[LoadRun, Summary]] = []
    async with AsyncExitStack() as stack:
        image_url = None
        if any(uses_image_server(w) for w in plan.workloads):
            image_url = await stack.enter_async_context(
                running_image_server(plan.image_dir, plan.log_dir, latency=plan.image_latency)
            )
        for repeat in range(plan.repeats):
            for name in _rotated(plan.servers, repeat):
                is_vlserve = vlserve_variant(name) is not None
                extra = vlserve_extra if is_vlserve else ()
                passes_file = plan.log_dir / f"probe-passes-{name}-{repeat}.json"
                env = {PROBE_PASSES_FILE_ENV: str(passes_file)} if is_vlserve else None
                source = dict(plan.sources).get(source_label(name) or "")
                first = len(out)
                async with running_server(
                    name, plan.log_dir, model=model, extra_args=extra, env=env, source=source
                ) as server:
                    async with httpx.AsyncClient(base_url=server.base_url, timeout=30.0) as client:
                        model_id = await first_model_id(client)
                    for workload_name in plan.workloads:
                        workload = Workload(workload_name, store if uses_images(workload_name) else None, image_url)
                        for level in plan.concurrency_levels:
                            await wait_for_quiet(plan.quiet_threshold, plan.quiet_wait)
                            run = await _one_run(plan, server, workload, model_id, level, repeat)
                            summary = summarise(run)
                            out.append((run, summary))
                            if progress is not None:
                                progress(run, summary)
                # the server wrote its probes' scheduler passes on the way out
                out[first:] = [(run, with_probe_passes(summary, passes_file)) for run, summary in out[first:]]
    return out


def _rotated(servers: tuple[str, ...], by: int) -> tuple[str, ...]:
    """Each repeat starts with the next server, so no server always runs first."""
    by %= len(servers)
    return servers[by:] + servers[:by]


async def wait_for_quiet(threshold: float, max_wait: float) -> float:
    """Wait (at most ``max_wait`` seconds, in 1 s windows) until other processes and the
    hypervisor's stolen time take less than ``threshold`` of the machine; return the last
    share seen (0 if not waiting).

    Cancellation: returns at the next window boundary.
    """
    deadline = trio.current_time() + max_wait
    share = 0.0
    while trio.current_time() < deadline:
        share = await trio.to_thread.run_sync(foreign_load_now, 1.0)
        if share < threshold:
            break
    return share


async def _one_run(plan: BenchmarkPlan, server, workload: Workload, model_id: str, level: int, repeat: int) -> LoadRun:
    options = replace(plan.options, concurrency=level)
    warm, measured = plan.indices(workload.name, level, repeat)

    def body_for(index: int) -> bytes:
        return chat_body(
            model_id,
            workload.messages(index),
            max_tokens=options.max_tokens,
            ignore_eos=options.ignore_eos,
            stream=options.stream,
        )

    lag_before = await scrape_lag_histogram(server.base_url)
    run = await run_load(
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
    run.repeat = repeat
    lag_after = await scrape_lag_histogram(server.base_url)
    if lag_before is not None and lag_after is not None:
        lag = lag_after.since(lag_before)
        run.loop_lag_p50_ms = lag.quantile(0.50) * 1000
        run.loop_lag_p99_ms = lag.quantile(0.99) * 1000
        run.loop_lag_samples = int(lag.count)
    return run


def timestamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")
