"""Run the app on hypercorn's trio server inside our own ``trio.run``.

``run_server`` is the building block (used by the CLI and the pytest plugin): it binds,
reports a ``RunningServer`` through ``task_status``, and serves until ``shutdown()`` is
called or the runtime fails. Shutdown is graceful, the Kubernetes way: readiness turns 503
at once while the listener keeps accepting and new requests are served for ``grace``
seconds (endpoints and load balancers take that long to stop routing here); then hypercorn
stops accepting and closes idle connections, in-flight requests get ``drain_timeout``
seconds to finish (then they are cancelled, which aborts their sequences), then the
runtime closes.

``serve_until_signalled`` adds SIGINT/SIGTERM handling for ``vlserve serve``: the first
signal drains as above with ``drain_grace`` seconds of grace, a second one stops at once.

Both serve on ``server.http_path`` (hypercorn's trio path with fewer scheduler passes per
request, probes answered inside the HTTP/1.1 protocol); ``fast_http=False`` serves on
hypercorn's own, as plain ``hypercorn --worker-class trio`` does.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio
from hypercorn.trio import serve as stock_serve
from quart_trio import QuartTrio

from server.app import create_app
from server.config import ServerConfig
from server.http_path import PROBE_PASSES_FILE_ENV, ProbePassLog
from server.http_path import serve as fast_serve
from server.hypercorn_config import hypercorn_config
from server.lifecycle import Phase, RuntimeFactory
from server.scheduler_passes import PassCounter
from server.state import ServerState, state_of

if TYPE_CHECKING:
    from server.runtime import Runtime

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILED = 1


@dataclass
class RunningServer:
    """A bound, serving app. ``urls`` are the bound base URLs (``http://host:port``)."""

    app: QuartTrio
    state: ServerState
    urls: list[str]
    _close_listeners: trio.Event = field(default_factory=trio.Event)
    _stopped: trio.Event = field(default_factory=trio.Event)
    _shutdown: trio.Event = field(default_factory=trio.Event)
    _grace_s: float = 0.0

    @property
    def url(self) -> str:
        return self.urls[0]

    @property
    def shutting_down(self) -> bool:
        return self._shutdown.is_set()

    def shutdown(self, grace: float = 0.0) -> None:
        """Begin a graceful shutdown (see module doc): readiness turns 503 now, the listener
        closes after ``grace`` seconds (at once if 0). Idempotent (a later call cannot
        lengthen the grace, only end it by passing 0); returns at once."""
        if grace <= 0:
            self.state.lifecycle.begin_drain()
            self._close_listeners.set()
        else:
            self.state.lifecycle.withdraw_readiness()
        if not self._shutdown.is_set():
            self._grace_s = grace
            self._shutdown.set()

    async def _close_listeners_after_grace(self) -> None:
        """Once shutdown has begun, wait out its grace (cut short by a later ``shutdown()``
        without grace, which a runtime that closes on its own also calls), then refuse new
        work and close the listeners."""
        await self._shutdown.wait()
        with trio.move_on_after(self._grace_s):
            await self._close_listeners.wait()
        if not self._close_listeners.is_set():
            log.info("drain grace over: closing the listener")
        self.state.lifecycle.begin_drain()
        self._close_listeners.set()

    async def wait_ready(self) -> Runtime:
        """Wait for the model to be loaded; raises ``RuntimeFailed`` if it failed."""
        return await self.state.lifecycle.wait_ready()

    async def wait_stopped(self) -> None:
        """Wait until the server has stopped serving and closed the runtime."""
        await self._stopped.wait()


async def run_server(
    config: ServerConfig,
    *,
    runtime_factory: RuntimeFactory | None = None,
    hypercorn_options: Mapping[str, Any] | None = None,
    fast_http: bool = True,
    pass_log: ProbePassLog | None = None,
    task_status: trio.TaskStatus[RunningServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``config`` until ``RunningServer.shutdown()`` or a runtime failure.

    Reports the ``RunningServer`` once the sockets are bound (the model may still load).
    ``fast_http`` picks ``server.http_path`` (else hypercorn's own trio path);
    ``pass_log`` (fast path only) records each probe's scheduler passes.
    Cancellation: stops at once; in-flight requests are cancelled and the runtime closed.
    """
    app = create_app(config, runtime_factory=runtime_factory)
    hyper = hypercorn_config(config, hypercorn_options)
    close_listeners = trio.Event()
    stopped = trio.Event()
    try:
        async with trio.open_nursery() as nursery:
            if fast_http and not hyper.quic_bind:  # server.http_path serves TCP only
                serve = partial(
                    fast_serve,
                    probes=app.probe_responder,
                    pass_log=pass_log,
                    probe_lane=config.probe_lane,
                    lane_process=config.probe_lane_process,
                    watch_phase=state_of(app).lifecycle.watch_phase,
                )
            else:
                serve = stock_serve
            serve_task = partial(_serve_then_cancel, serve, app, hyper, close_listeners, nursery.cancel_scope)
            urls = await nursery.start(serve_task)
            server = RunningServer(app, state_of(app), urls, close_listeners, stopped)
            nursery.start_soon(_shut_down_when_runtime_closes, server)
            nursery.start_soon(server._close_listeners_after_grace)
            task_status.started(server)
    finally:
        stopped.set()


async def _serve_then_cancel(
    serve: Any,
    app: QuartTrio,
    hyper: Any,
    shutdown: trio.Event,
    cancel_scope: trio.CancelScope,
    *,
    task_status: trio.TaskStatus[list[str]],
) -> None:
    await serve(app, hyper, shutdown_trigger=shutdown.wait, task_status=task_status)
    cancel_scope.cancel()


async def _shut_down_when_runtime_closes(server: RunningServer) -> None:
    """A runtime that fails (or stops) on its own takes the server down with it."""
    await server.state.lifecycle.wait_closed()
    if server.state.lifecycle.phase is Phase.FAILED:
        log.error("shutting down: the model runtime failed")
    server.shutdown()


async def serve_until_signalled(
    config: ServerConfig,
    *,
    runtime_factory: RuntimeFactory | None = None,
    hypercorn_options: Mapping[str, Any] | None = None,
) -> int:
    """Serve until SIGINT/SIGTERM, drain, and return the process exit status.

    0 after a graceful drain; 1 if the runtime failed or a second signal forced the stop.
    With ``VLSERVE_PROBE_PASSES_FILE`` set, probes' scheduler passes are counted and their
    summary written to that file on the way out (``server.http_path.probe_passes``).
    """
    pass_log = _pass_log_from_env()
    try:
        return await _serve_until_signalled(config, runtime_factory, hypercorn_options, pass_log)
    finally:
        if pass_log is not None:
            trio.lowlevel.remove_instrument(pass_log.counter)
            pass_log.write(Path(os.environ[PROBE_PASSES_FILE_ENV]))


def _pass_log_from_env() -> ProbePassLog | None:
    if not os.environ.get(PROBE_PASSES_FILE_ENV):
        return None
    counter = PassCounter()
    trio.lowlevel.add_instrument(counter)
    return ProbePassLog(counter)


async def _serve_until_signalled(
    config: ServerConfig,
    runtime_factory: RuntimeFactory | None,
    hypercorn_options: Mapping[str, Any] | None,
    pass_log: ProbePassLog | None,
) -> int:
    forced = False
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            start = partial(
                run_server,
                config,
                runtime_factory=runtime_factory,
                hypercorn_options=hypercorn_options,
                pass_log=pass_log,
            )
            server: RunningServer = await nursery.start(start)
            for url in server.urls:
                log.info("vlserve listening on %s", url)

            async def watch_signals() -> None:
                nonlocal forced
                async for signum in signals:
                    if server.shutting_down:
                        log.warning("second %s: stopping now", signal.Signals(signum).name)
                        forced = True
                        nursery.cancel_scope.cancel()
                        return
                    log.info(
                        "%s: draining (/ready answers 503; new requests served for %g s, then up to %g s for in-flight ones)",
                        signal.Signals(signum).name,
                        config.drain_grace,
                        config.drain_timeout,
                    )
                    server.shutdown(grace=config.drain_grace)

            nursery.start_soon(watch_signals)
            await server.wait_stopped()
            nursery.cancel_scope.cancel()
    if forced or server.state.lifecycle.phase is Phase.FAILED:
        return EXIT_FAILED
    log.info("vlserve stopped")
    return EXIT_OK
