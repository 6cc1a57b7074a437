"""Preparation work in prep worker processes (trio-parallel), off the server's GIL.

Template rendering, tokenization, image decode and preprocessing hold the GIL for much of
their run; in worker threads they make the event loop wait for the GIL, and ``/health``
with it. ``ProcessPrep`` runs the same typed steps (``vl.prep_tools.PrepStep``) in worker
processes instead, each of which loads its own tokenizer and image processor once, at
start. The gates stay in the server process: ``Gate.run_in_process`` holds a token for as
long as a worker process runs the call, and a cancelled caller waits for the call to end,
so a gate's borrowed tokens still equal the work running under it.

Image pixels come back through shared memory, not the pipe: the ``ImagePixels`` step
writes them into a pixel slot and returns a small ``SlotImage``. Each process attaches to
a slot pool once, on its first image, and keeps the mapping for its life (its tools cache
it, ``PrepTools.slot_memory``); attaching registers nothing with a resource tracker, so a
prep process's exit never unlinks the pool's segment (``engine.pixel_slots``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TypeVar

import trio
import trio_parallel

from engine.malloc_tunables import apply_tunables
from vl.errors import prep_process_died
from vl.gates import BorrowTimes, Gate
from vl.prep_tools import PrepStep, PrepTools, PrepToolsSpec
from vl.text_tokenizer import TokenizerSnapshot

T = TypeVar("T")

SHUTDOWN_GRACE_SECONDS = 10.0


class ProcessPrep:
    """Runs preparation steps in a pool of prep worker processes."""

    def __init__(self, spec: PrepToolsSpec, context: trio_parallel.WorkerContext) -> None:
        self._spec = spec
        self._context = context

    @classmethod
    @asynccontextmanager
    async def open(
        cls, spec: PrepToolsSpec, *, workers: int, nice: int = 0, malloc_tunables: str = ""
    ) -> AsyncIterator[ProcessPrep]:
        """Start ``workers`` prep processes and wait until each has loaded its tools.

        The pool may grow past ``workers`` only if more calls run at once than that (the
        gates' capacities decide). Each process adds ``nice`` to its niceness and applies
        ``malloc_tunables`` (``engine.malloc_tunables.apply_tunables``) first. Leaving the
        block waits for running calls, then stops the processes (killed after
        ``SHUTDOWN_GRACE_SECONDS``). Cancellation while starting: the block is not entered
        and the processes are stopped the same way."""
        if workers < 1:
            raise ValueError("ProcessPrep needs at least one worker")
        async with trio_parallel.open_worker_context(
            idle_timeout=math.inf,
            init=functools.partial(_start_worker, spec, spec.tokenizer, nice, malloc_tunables),
            grace_period=SHUTDOWN_GRACE_SECONDS,
        ) as context:
            prep = cls(spec, context)
            await prep._start_workers(workers)
            yield prep

    async def run(self, gate: Gate, step: PrepStep[T], times: BorrowTimes | None = None) -> T:
        """Run ``step`` in a prep process holding a token of ``gate`` (``PrepRunner.run``).

        A process that dies while running the step (killed, crashed) fails this call alone
        with ``vl.errors.PrepFailed``; the pool starts a fresh process for the next call."""
        try:
            return await gate.run_in_process(self._context, _run_step, self._spec, step, times=times)
        except trio_parallel.BrokenWorkerError as exc:
            raise prep_process_died(_exit_status(exc)) from exc

    @property
    def context(self) -> trio_parallel.WorkerContext:
        """The pool itself, for running other picklable functions in the prep processes
        (``Gate.run_in_process``); leaving ``open`` closes it."""
        return self._context

    def worker_count(self) -> int:
        """Prep worker processes alive now (idle or running a call)."""
        stats = self._context.statistics()
        return stats.idle_workers + stats.running_workers

    async def _start_workers(self, workers: int) -> None:
        # Calls started together each take a worker of their own (a new one while none is
        # idle), so ``workers`` concurrent calls leave ``workers`` loaded processes idle.
        limiter = trio.CapacityLimiter(workers)
        async with trio.open_nursery() as nursery:
            for _ in range(workers):
                nursery.start_soon(functools.partial(self._context.run_sync, _load_tools, self._spec, limiter=limiter))


def _exit_status(error: trio_parallel.BrokenWorkerError) -> int | None:
    """The exit status of the dead process ``error`` names (trio-parallel passes the
    ``multiprocessing.Process`` among its arguments), if any."""
    for arg in error.args:
        exitcode = getattr(arg, "exitcode", None)
        if exitcode is not None:
            return exitcode
    return None


def _start_worker(spec: PrepToolsSpec, tokenizer: TokenizerSnapshot | None, nice: int, malloc_tunables: str) -> None:
    """Runs first in each prep worker process: set up malloc, lower its priority, load its
    tools from ``spec`` and the ``tokenizer`` snapshot (which pickling leaves out of the
    spec: it reaches the process here, once). (trio-parallel starts the process with the
    server's environment, so malloc is set up here rather than through
    ``GLIBC_TUNABLES``.)"""
    apply_tunables(malloc_tunables, os.environ)
    if nice:
        os.nice(nice)
    _tools_for(dataclasses.replace(spec, tokenizer=tokenizer))
    torch = sys.modules.get("torch")  # loaded only where the tools need transformers' own classes
    if torch is not None:
        torch.set_num_threads(1)  # one call at a time per process: intra-op threads would only oversubscribe


@functools.cache
def _tools_for(spec: PrepToolsSpec) -> PrepTools:
    """This process's tools for ``spec``, loaded on first use (in a prep worker process,
    by ``_start_worker``, from the spec with its tokenizer snapshot) and kept for the life
    of the process; the specs that arrive with calls (no snapshot) equal that one."""
    return spec.load()


def _load_tools(spec: PrepToolsSpec) -> None:
    """Runs in a prep worker process: make sure its tools are loaded (returns nothing, so
    no tokenizer is pickled back)."""
    _tools_for(spec)


def _run_step(spec: PrepToolsSpec, step: PrepStep[T]) -> T:
    """Runs in a prep worker process: one step on this process's tools."""
    return step.run(_tools_for(spec))
