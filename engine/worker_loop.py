"""The engine worker process's event loop: the step loop's work in a thread holding the
device gate, the front end's socket read meanwhile. No torch import here.

The worker keeps the card's shape (docs/architecture.md, "Processes and ownership"):

- one trio task reads the socket the whole time, so new sequences and aborts sent during
  a step are taken in at once (``Inbox``), and a run of back-to-back decode sub-steps
  ends as soon as one has arrived (``has_news``);
- every piece of step-loop work runs in a worker thread through
  ``trio.to_thread.run_sync(..., limiter=device_gate)``: the thread doing the work holds
  the gate and is never abandoned. One such call runs steps back to back for as long as
  there is work (``_run_while_busy``): before each step it applies what the inbox holds
  (admitting new sequences: their pixels are read in place in their slots), after it the thread
  writes the step's outputs to the socket itself (``OutputWriter``). A step therefore
  never waits for this process's event loop: with a round trip through the loop per
  step, the step thread sat idle for ~15 % of a 64-stream text burst, waiting for the
  loop thread to get a CPU and the GIL (bench/README.md, "An engine that does not wait
  for its event loop"). Aborts apply between steps, as before;
- when the front end closes its end (it is stopping us, or it died), or ``serve_steps``
  is cancelled, the thread is told to stop: the step in flight finishes (its outputs are
  dropped with the connection), then ``serve_steps`` returns.
"""

from __future__ import annotations

import select
import socket
import threading
from typing import TYPE_CHECKING

import trio

from engine.core_messages import StepOutputs, Submit
from engine.wire import MessageReceiver, encode

if TYPE_CHECKING:
    from engine.step_loop import StepLoop


class FrontEndGone(Exception):
    """The front end's end of the socket is closed: outputs can no longer be sent."""


class Inbox:
    """Submits received from the front end and not yet applied.

    ``put`` and ``wait`` run on the event loop; ``take`` and ``__bool__`` (the step's
    ``has_news``) run in the step thread, so the list is guarded by a lock.
    """

    def __init__(self) -> None:
        self._submits: list[Submit] = []
        self._lock = threading.Lock()
        self._lot = trio.lowlevel.ParkingLot()

    def put(self, submit: Submit) -> None:
        with self._lock:
            self._submits.append(submit)
        self._lot.unpark_all()

    def take(self) -> list[Submit]:
        """Everything received since the last ``take``, oldest first."""
        with self._lock:
            submits, self._submits = self._submits, []
        return submits

    async def wait(self) -> None:
        """Return once a submit is waiting (at once if one is). Cancellation: safe."""
        while not self._submits:
            await self._lot.park()

    def __bool__(self) -> bool:
        return bool(self._submits)


class OutputWriter:
    """Writes ``StepOutputs`` to the front end from the step thread.

    The socket stays non-blocking (trio reads it meanwhile); a write the socket buffer
    cannot take whole waits for room in ``poll``, in the calling thread. Not for use on
    the event loop. One writer per socket: messages leave whole and in call order.
    """

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._poll = select.poll()
        self._poll.register(sock.fileno(), select.POLLOUT)

    def send(self, outputs: StepOutputs) -> None:
        """Write one message. Raises ``FrontEndGone`` if the front end has closed its end."""
        view = memoryview(encode(outputs))
        try:
            while view:
                try:
                    view = view[self._sock.send(view) :]
                except BlockingIOError:
                    self._poll.poll()
        except OSError as exc:  # EPIPE, ECONNRESET: the front end is gone
            raise FrontEndGone(str(exc)) from exc


async def serve_steps(
    loop: StepLoop,
    sock: socket.socket,
    inbox: Inbox,
    device_gate: trio.CapacityLimiter | None = None,
) -> None:
    """Serve the front end on ``sock`` until it closes its end: apply what arrives, step
    while there is work, send each step's outputs (and, before a step, which pixel slots
    were read). ``loop`` must have been built with ``has_news=inbox.__bool__``.

    Cancellation: the step thread is told to stop; the step in flight finishes first (its
    thread is never abandoned), then this returns.
    """
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
    gate = device_gate or trio.CapacityLimiter(1)
    stop = threading.Event()
    writer = OutputWriter(sock)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_receive, stream, inbox, nursery.cancel_scope)
        nursery.start_soon(_stop_when_cancelled, stop)
        try:
            while not stop.is_set():
                if not inbox and not loop.has_work():
                    await inbox.wait()
                await trio.to_thread.run_sync(_run_while_busy, loop, inbox, writer, stop, limiter=gate)
        except FrontEndGone:
            pass  # the front end closed while we were sending: it is stopping us
        nursery.cancel_scope.cancel()


def _run_while_busy(loop: StepLoop, inbox: Inbox, writer: OutputWriter, stop: threading.Event) -> None:
    """Runs in the step thread, holding the device gate: apply the inbox, run a step, send
    its outputs; again, until there is no work left or ``stop`` is set. Sends a statistics
    message after submits that needed no step (e.g. aborts of waiting sequences), and the
    outputs ``accept`` gives (pixel slots read, sequences failed on arrival) before the
    step. Raises ``FrontEndGone`` if a send finds the front end gone."""
    while not stop.is_set():
        submits = inbox.take()
        if submits:
            early = loop.accept(submits)
            if early is not None:
                writer.send(early)  # free the slots now, not after the step
        outputs = loop.run_step()
        if outputs is not None:
            writer.send(outputs)
        elif submits:
            writer.send(loop.news())
        if not loop.has_work() and not inbox:
            return


async def _stop_when_cancelled(stop: threading.Event) -> None:
    """Sets ``stop`` as soon as the worker's nursery is cancelled (by the reader at end of
    stream, or from outside), so the step thread returns after its current step."""
    try:
        await trio.sleep_forever()
    finally:
        stop.set()


async def _receive(stream: trio.SocketStream, inbox: Inbox, stop: trio.CancelScope) -> None:
    receiver = MessageReceiver(stream)
    try:
        while (message := await receiver.receive()) is not None:
            if isinstance(message, Submit):
                inbox.put(message)
    except trio.BrokenResourceError:
        pass
    stop.cancel()  # end of stream: the front end is gone or stopping us
