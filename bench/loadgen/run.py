"""One measured load run against one server: warm-up, burst, /health probes, RSS samples."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import trio

from bench.launch.process import free_port, managed_process
from bench.launch.readiness import http_ready
from bench.launch.servers import REPO_ROOT
from bench.loadgen.chat_request import complete_chat, stream_chat
from bench.loadgen.client_pool import ClientPool
from bench.loadgen.cpu_account import CpuAccount
from bench.loadgen.drivers import closed_loop, poisson
from bench.loadgen.options import LoadOptions
from bench.loadgen.request_result import RequestResult
from bench.loadgen.rss_sampler import sample_rss, tree_cpu_seconds_by_role, tree_rss

CUT_OFF = "cut off by --max-seconds"


@dataclass
class LoadRun:
    """Everything one run observed. Times are on the ``time.monotonic`` clock.

    ``results`` are the measured requests only (warm-up excluded), cut-off ones included
    with ``ok`` False. ``health`` holds every keep-alive probe ``(sent, latency, status)``
    from before the warm-up to after the burst, ``health_fresh`` the probes made on a new
    connection each; ``rss`` holds ``(time, bytes)`` during the burst.
    """

    options: LoadOptions
    server: str
    workload: str
    burst_started: float = 0.0
    burst_ended: float = 0.0
    warmup_started: float = 0.0
    results: list[RequestResult] = field(default_factory=list)
    warmup_failures: int = 0
    health: list[tuple[float, float, int]] = field(default_factory=list)
    health_fresh: list[tuple[float, float, int]] = field(default_factory=list)
    # the same two probers against a do-nothing server (bench/floor_server.py) beside the
    # server under test: the machine's probe floor during this very burst
    floor_health: list[tuple[float, float, int]] = field(default_factory=list)
    floor_health_fresh: list[tuple[float, float, int]] = field(default_factory=list)
    rss: list[tuple[float, int]] = field(default_factory=list)
    rss_before: int = 0
    loadavg_before: float = 0.0
    loadavg_after: float = 0.0
    foreign_cpu: float = 0.0  # other processes' share of all cores during the burst (0..1)
    steal_cpu: float = 0.0  # the hypervisor's stolen share of all cores during the burst (0..1)
    server_cpu_seconds: float = 0.0  # CPU the server's process tree used during the burst
    # the same per part of the tree (``rss_sampler.CPU_ROLES``: front end, engine, prep)
    server_cpu_by_role: dict[str, float] = field(default_factory=dict)
    pss: list[tuple[float, int]] = field(default_factory=list)  # the tree's PSS during the burst
    repeat: int = 0
    # the server's own event-loop lag over warm-up + burst, from its /metrics (vlserve only)
    loop_lag_p50_ms: float = float("nan")
    loop_lag_p99_ms: float = float("nan")
    loop_lag_samples: int = 0


async def run_load(
    *,
    base_url: str,
    server: str,
    server_pid: int,
    workload: str,
    body_for: Callable[[int], bytes],
    kind_of: Callable[[int], str],
    warmup_indices: list[int],
    indices: list[int],
    options: LoadOptions,
    work_dir: Path,
) -> LoadRun:
    """Warm up, then send the measured burst, probing ``/health`` from its own process.

    Request bodies are built before each phase starts (in a worker thread), never during it.
    The burst stops issuing after ``options.max_seconds`` and cancels what is still running
    ``options.grace_seconds`` later. Cancellation: every request, the probe process and the
    sampler are stopped before ``Cancelled`` propagates.
    """
    run = LoadRun(options=options, server=server, workload=workload)
    timeout = httpx.Timeout(options.max_seconds + options.grace_seconds, connect=30.0)
    probe_out = work_dir / f"health-{server}-{workload}-c{options.concurrency}-{time.time_ns()}.json"
    floor_out = probe_out.with_name("floor-" + probe_out.name)
    async with ClientPool.open(base_url, options.concurrency, timeout) as clients:
        async with (
            _floor_server_process(work_dir) as floor_url,
            _health_probe_process(floor_url, options, floor_out),
            _health_probe_process(base_url, options, probe_out),
        ):
            await trio.sleep(options.idle_probe_seconds)
            run.warmup_started = time.monotonic()
            warm = await _send_all(clients, body_for, kind_of, warmup_indices, options, warmup=True)
            run.warmup_failures = sum(not r.ok for r in warm)
            run.rss_before = await trio.to_thread.run_sync(tree_rss, server_pid)
            cpu_before = await trio.to_thread.run_sync(tree_cpu_seconds_by_role, server_pid)
            run.loadavg_before = os.getloadavg()[0]
            account = CpuAccount()
            await trio.to_thread.run_sync(account.start)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sample_rss, server_pid, options.rss_interval, run.rss, run.pss)
                run.burst_started = time.monotonic()
                run.results = await _send_all(clients, body_for, kind_of, indices, options, warmup=False)
                run.burst_ended = time.monotonic()
                run.loadavg_after = os.getloadavg()[0]
                shares = await trio.to_thread.run_sync(account.shares)
                run.foreign_cpu, run.steal_cpu = shares.foreign, shares.stolen
                cpu_after = await trio.to_thread.run_sync(tree_cpu_seconds_by_role, server_pid)
                run.server_cpu_by_role = {
                    role: seconds - cpu_before.get(role, 0.0) for role, seconds in cpu_after.items()
                }
                run.server_cpu_seconds = sum(run.server_cpu_by_role.values())
                nursery.cancel_scope.cancel()
            await trio.sleep(options.idle_probe_seconds)
    run.health, run.health_fresh = _read_probes(probe_out)
    run.floor_health, run.floor_health_fresh = _read_probes(floor_out)
    return run


def _read_probes(out: Path) -> tuple[list[tuple[float, float, int]], list[tuple[float, float, int]]]:
    """A probe process's keep-alive and fresh-connection samples (none if it was killed
    before it could write); its files are removed."""
    try:
        probes = json.loads(out.read_text())
    except FileNotFoundError:
        probes = {}
    for suffix in (".json", ".log", ".started"):
        out.with_suffix(suffix).unlink(missing_ok=True)
    return [tuple(s) for s in probes.get("samples", [])], [tuple(s) for s in probes.get("fresh_samples", [])]


@asynccontextmanager
async def _floor_server_process(work_dir: Path) -> AsyncIterator[str]:
    """A do-nothing server (``bench.floor_server``) on a free loopback port for the block;
    yields its base URL once it answers."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "bench.floor_server", "--port", str(port)]
    async with managed_process(
        command,
        log_path=work_dir / f"floor-server-{port}.log",
        ready=http_ready(url, paths=("/health",)),
        stop_signal=signal.SIGINT,
        startup_timeout=30.0,
        cwd=REPO_ROOT,
    ):
        yield url


async def _send_all(
    clients: ClientPool, body_for, kind_of, indices: list[int], options: LoadOptions, *, warmup: bool
) -> list[RequestResult]:
    bodies = await trio.to_thread.run_sync(lambda: {i: body_for(i) for i in indices})
    results: list[RequestResult] = []
    chat = stream_chat if options.stream else complete_chat

    async def send(index: int) -> None:
        result = RequestResult(index=index, kind=kind_of(index), started=time.perf_counter())
        results.append(result)
        try:
            async with clients.client() as client:
                await chat(client, bodies.pop(index), result, close_connection=options.connection_per_request)
        finally:
            if not result.ok and result.error is None:  # only a cancellation leaves neither
                result.error = CUT_OFF

    if warmup:
        await closed_loop(send, indices, max(1, min(options.concurrency, len(indices))))
        return results
    stop_issuing = trio.current_time() + options.max_seconds
    with trio.move_on_after(options.max_seconds + options.grace_seconds):
        if options.request_rate is None:
            await closed_loop(send, indices, options.concurrency, stop_issuing)
        else:
            await poisson(send, indices, options.request_rate, options.concurrency, options.seed, stop_issuing)
    return results


def _probe_command(base_url: str, options: LoadOptions, out: Path) -> list[str]:
    bound = options.max_seconds + options.grace_seconds + 600
    return [
        sys.executable,
        "-m",
        "bench.loadgen.health_probe",
        base_url,
        "--out",
        str(out),
        "--interval",
        str(options.health_interval),
        "--max-seconds",
        str(bound),
    ]


def _health_probe_process(base_url: str, options: LoadOptions, out: Path):
    """The probe process for the block, entered once it has had its first answer; it
    writes ``out`` when stopped (SIGINT)."""
    marker = out.with_suffix(".started")

    async def started() -> bool:
        return marker.exists()

    return managed_process(
        _probe_command(base_url, options, out),
        log_path=out.with_suffix(".log"),
        ready=started,
        stop_signal=signal.SIGINT,
        startup_timeout=60.0,
        stop_timeout=30.0,
        cwd=REPO_ROOT,
    )
