"""The runtime's lifetime inside the app: open it in the background, hold it, close it.

Readiness is this object's phase: ``LOADING`` until the runtime is open, ``READY`` while it
serves, ``DRAINING`` once shutdown has begun (readiness answers 503; during the drain's grace
period new requests are still served, after it they are refused while in-flight ones keep
their runtime; see ``takes_new_work``), ``STOPPED`` after it closed, ``FAILED`` if opening it or running it
raised. The runtime factory is any ``ServerConfig -> async context manager of Runtime``.

The lifecycle also owns the event loop's lag monitor (``server.loop_lag``): it runs for as
long as ``run()`` does, from before the model loads until the runtime has closed. While the
model loads it logs a line when loading starts and one every ``LOAD_PROGRESS_INTERVAL_S``
seconds after, so a log shows a long stage going on; the stages themselves (tokenizer,
processor, weights, warm-up) are reported by ``server.load_progress``. The phase turns
``READY`` only once the factory has yielded the runtime, which ``server.runtime`` does
after the engine's warm-up sequence.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any

import trio

from engine.errors import ModelLoadError
from server.config import ServerConfig
from server.loop_lag import LoopLagMonitor

if TYPE_CHECKING:
    from server.runtime import Runtime

RuntimeFactory = Callable[[ServerConfig], AbstractAsyncContextManager[Any]]

log = logging.getLogger(__name__)

LOAD_PROGRESS_INTERVAL_S = 15.0


class Phase(enum.Enum):
    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"
    STOPPED = "stopped"
    FAILED = "failed"


class RuntimeFailed(RuntimeError):
    """The runtime could not be opened, or stopped on its own."""


class RuntimeLifecycle:
    """Opens one runtime with ``factory(config)`` and keeps it open until ``stop()``."""

    def __init__(
        self,
        config: ServerConfig,
        factory: RuntimeFactory,
        loop_lag: LoopLagMonitor | None = None,
    ) -> None:
        self.config = config
        self.loop_lag = loop_lag or LoopLagMonitor()
        self._phase = Phase.LOADING
        self._phase_watchers: list[Callable[[], None]] = []
        self.runtime: Runtime | None = None
        self.load_seconds: float | None = None
        self.error: BaseException | None = None
        self._factory = factory
        self._refusing = False
        self._settled = trio.Event()
        self._stop = trio.Event()
        self._closed = trio.Event()

    async def run(self) -> None:
        """Open the runtime, publish it, hold it until ``stop()``, then close it; measure
        the loop's lag meanwhile.

        A failure while opening or running is logged and leaves the phase ``FAILED``; it
        is not raised, so the server stays up to report it (``/health`` answers 503).
        Cancellation: the runtime is closed (its own tasks are cancelled) and ``Cancelled``
        propagates; waiters are released either way.
        """
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.loop_lag.run)
            nursery.start_soon(self._log_loading)
            try:
                await self._hold_runtime()
            finally:
                nursery.cancel_scope.cancel()

    async def _log_loading(self) -> None:
        """One line as loading starts, then one every ``LOAD_PROGRESS_INTERVAL_S`` until the
        runtime is settled. Cancellation: returns, nothing to undo."""
        started = trio.current_time()
        log.info("loading model %s", self.config.model or "(built-in tiny model)")
        while True:
            with trio.move_on_after(LOAD_PROGRESS_INTERVAL_S):
                await self._settled.wait()
                return
            log.info("still loading the model: %.0f s so far", trio.current_time() - started)

    async def _hold_runtime(self) -> None:
        started = time.monotonic()
        try:
            async with self._factory(self.config) as runtime:
                self.load_seconds = time.monotonic() - started
                self.runtime = runtime
                loaded = runtime.loaded
                log.info(
                    "loaded model %s as %r (device=%s, dtype=%s, max_model_len=%d) in %.2f s",
                    loaded.path,
                    runtime.model_name,
                    loaded.device,
                    loaded.dtype,
                    runtime.max_model_len,
                    self.load_seconds,
                )
                if self.phase is Phase.LOADING:
                    self.phase = Phase.READY
                self._settled.set()
                await self._stop.wait()
        except Exception as error:
            if isinstance(error, ModelLoadError):  # the user's mistake: one clear line
                log.error("cannot serve the model: %s", error)
            else:
                log.error("the model runtime failed", exc_info=error)
            self.error = error
            self.phase = Phase.FAILED
        finally:
            self.runtime = None
            if self.phase is not Phase.FAILED:
                self.phase = Phase.STOPPED
            self._settled.set()
            self._closed.set()

    @property
    def phase(self) -> Phase:
        return self._phase

    @phase.setter
    def phase(self, phase: Phase) -> None:
        self._phase = phase
        for watcher in self._phase_watchers:
            watcher()

    def watch_phase(self, watcher: Callable[[], None]) -> None:
        """Call ``watcher()`` (on the event loop, synchronously: it must not block or
        raise) after every phase change from now on."""
        self._phase_watchers.append(watcher)

    def withdraw_readiness(self) -> None:
        """Readiness answers 503 from now on, but new requests are still served: the
        grace period of a drain, while load balancers stop sending traffic here."""
        if self.phase in (Phase.LOADING, Phase.READY):
            self.phase = Phase.DRAINING

    def begin_drain(self) -> None:
        """Stop taking new work (readiness answers 503); in-flight work carries on."""
        self.withdraw_readiness()
        self._refusing = True

    @property
    def takes_new_work(self) -> bool:
        """Whether a new request may start on the runtime: while ready, and during the
        grace period of a drain (``withdraw_readiness`` without ``begin_drain``)."""
        if self.runtime is None:
            return False
        return self.phase is Phase.READY or (self.phase is Phase.DRAINING and not self._refusing)

    def stop(self) -> None:
        """Drain, and let ``run()`` close the runtime. Idempotent."""
        self.begin_drain()
        self._stop.set()

    async def wait_ready(self) -> Runtime:
        """Wait until the runtime is open and return it.

        Raises ``RuntimeFailed`` if it failed or was stopped before it became ready.
        Cancellation: safe, nothing to undo.
        """
        await self._settled.wait()
        if self.runtime is None or self.phase is Phase.FAILED:
            raise RuntimeFailed(f"the model runtime is {self.phase.value}") from self.error
        return self.runtime

    async def wait_closed(self) -> None:
        """Wait until ``run()`` has returned (closed, failed or cancelled)."""
        await self._closed.wait()
