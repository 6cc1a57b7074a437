"""The engine worker process's event loop: the step loop's work in a thread holding the
device gate, the front end's socket read meanwhile. No torch import here.

The worker keeps the card's shape (docs/architecture.md, "The engine worker process"):

- one trio task reads the socket the whole time, so new sequences and aborts sent during
  a step are taken in at once (``Inbox``), and a run of back-to-back decode sub-steps
  ends as soon as one has arrived (``has_news``);
- every piece of step-loop work (admitting new sequences, which copies their pixels out
  of their slots; a step, with its vision-encoder batches and forwards) runs in a worker
  thread through ``trio.to_thread.run_sync(..., limiter=device_gate)``: the thread doing
  the work holds the gate, one at a time, and is never abandoned, so a step that has
  started always finishes and its outputs are sent before anything else runs; aborts
  apply between steps;
- when the front end closes its end (it is stopping us, or it died), the reader cancels
  the loop: a step in flight finishes (its result is dropped with the connection), then
  ``serve_steps`` returns.
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING

import trio

from engine.core_messages import StepOutputs, Submit
from engine.wire import MessageReceiver, encode

if TYPE_CHECKING:
    from engine.step_loop import StepLoop


class Inbox:
    """Submits received from the front end and not yet applied.

    Event loop only, except ``__bool__``, which the step thread reads as ``has_news`` (a
    stale answer costs at most one extra decode sub-step).
    """

    def __init__(self) -> None:
        self._submits: list[Submit] = []
        self._lot = trio.lowlevel.ParkingLot()

    def put(self, submit: Submit) -> None:
        self._submits.append(submit)
        self._lot.unpark_all()

    def take(self) -> list[Submit]:
        """Everything received since the last ``take``, oldest first."""
        submits, self._submits = self._submits, []
        return submits

    async def wait(self) -> None:
        """Return once a submit is waiting (at once if one is). Cancellation: safe."""
        while not self._submits:
            await self._lot.park()

    def __bool__(self) -> bool:
        return bool(self._submits)


async def serve_steps(
    loop: StepLoop,
    sock: socket.socket,
    inbox: Inbox,
    device_gate: trio.CapacityLimiter | None = None,
) -> None:
    """Serve the front end on ``sock`` until it closes its end: apply what arrives, step
    while there is work, send each step's outputs (and, before a step, which pixel slots
    were read). ``loop`` must have been built with ``has_news=inbox.__bool__``.

    Cancellation: a step in flight finishes first (its thread is never abandoned).
    """
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
    gate = device_gate or trio.CapacityLimiter(1)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_receive, stream, inbox, nursery.cancel_scope)
        try:
            await _step(loop, stream, inbox, gate)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the front end closed while we were sending: it is stopping us
        nursery.cancel_scope.cancel()


async def _receive(stream: trio.SocketStream, inbox: Inbox, stop: trio.CancelScope) -> None:
    receiver = MessageReceiver(stream)
    try:
        while (message := await receiver.receive()) is not None:
            if isinstance(message, Submit):
                inbox.put(message)
    except trio.BrokenResourceError:
        pass
    stop.cancel()  # end of stream: the front end is gone or stopping us


async def _step(loop: StepLoop, stream: trio.SocketStream, inbox: Inbox, gate: trio.CapacityLimiter) -> None:
    async def send(outputs: StepOutputs) -> None:
        await stream.send_all(encode(outputs))

    while True:
        if not inbox and not loop.has_work():
            await inbox.wait()
        submits = inbox.take()
        if submits:
            early = await trio.to_thread.run_sync(loop.accept, submits, limiter=gate)
            if early is not None:
                await send(early)  # free the slots now, not after the step
        outputs = await trio.to_thread.run_sync(loop.run_step, limiter=gate)
        if outputs is not None:
            await send(outputs)
        elif submits:
            await send(loop.news())  # e.g. aborts of waiting sequences: fresh statistics
