"""The framing of messages (``engine.core_messages``) between the front end and the
engine worker process.

Each message is one pickled object behind an 8-byte big-endian length. The two ends are
our own processes (the worker is started by the front end with a socket pair), so pickle
carries prompts, sampling parameters and image-feature tensors as they are. There is no
stop message: the worker stops when the front end closes its end.
``MessageReceiver`` reads them in trio (both ends, once the worker runs its steps),
``BlockingMessageSocket`` is the worker's end while it starts. No torch
import here (unpickling a tensor imports it).
"""

from __future__ import annotations

import pickle
import select
import socket
import struct

import trio

HEADER = struct.Struct("!Q")
RECEIVE_CHUNK = 1 << 16


def encode(message: object) -> bytes:
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return HEADER.pack(len(payload)) + payload


class Frames:
    """Splits a byte stream into messages (state only, no I/O)."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def pop_all(self) -> list[object]:
        messages = []
        while len(self._buffer) >= HEADER.size:
            (size,) = HEADER.unpack_from(self._buffer)
            end = HEADER.size + size
            if len(self._buffer) < end:
                break
            messages.append(pickle.loads(memoryview(self._buffer)[HEADER.size : end]))
            del self._buffer[:end]
        return messages

    @property
    def partial(self) -> bool:
        return bool(self._buffer)


class MessageReceiver:
    """Reads messages from a trio stream, one at a time."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._frames = Frames()
        self._ready: list[object] = []

    async def receive(self) -> object | None:
        """The next message, or ``None`` at end of stream.

        Cancellation: safe; bytes already read stay buffered for the next call.
        """
        while not self._ready:
            data = await self._stream.receive_some(RECEIVE_CHUNK)
            if not data:
                return None
            self._frames.feed(data)
            self._ready = self._frames.pop_all()
        return self._ready.pop(0)


class BlockingMessageSocket:
    """The worker's end: blocking sends, and receives that can poll without blocking."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._frames = Frames()
        self.closed = False

    def send(self, message: object) -> None:
        self._sock.sendall(encode(message))

    def detach(self) -> socket.socket:
        """The socket, for a reader that takes over from here (``engine.worker_loop``).
        Raises ``RuntimeError`` if part of a message has been read: it would be lost."""
        if self._frames.partial:
            raise RuntimeError("a message is half read; it would be lost")
        return self._sock

    def readable(self) -> bool:
        """True if a message (or end of stream) is waiting to be read."""
        return bool(select.select([self._sock], [], [], 0)[0])

    def receive_all(self, block: bool) -> list[object]:
        """Every complete message that has arrived; with ``block``, wait for at least one.
        A message that has started arriving is always read to its end. Sets ``closed`` at
        end of stream."""
        messages: list[object] = []
        while not self.closed:
            if not (block and not messages) and not self._frames.partial and not self.readable():
                break
            data = self._sock.recv(RECEIVE_CHUNK)
            if not data:
                self.closed = True
                break
            self._frames.feed(data)
            messages.extend(self._frames.pop_all())
        return messages
