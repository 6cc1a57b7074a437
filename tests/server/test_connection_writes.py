"""How ``server.http_path.connection.FastTCPServer`` writes: a write the socket takes whole
returns without a checkpoint; the rest of one that does not fit is sent in order through
trio's ``send_all``; a peer that is gone closes the protocol instead of raising."""

from __future__ import annotations

import socket

import trio
import trio.testing
from hypercorn.config import Config
from hypercorn.events import Closed, RawData

from server.http_path.connection import FastTCPServer


class RecordingProtocol:
    """Stands in for the HTTP protocol: records what the connection tells it."""

    def __init__(self) -> None:
        self.events: list[object] = []

    async def handle(self, event: object) -> None:
        self.events.append(event)


def connection_over(sock: trio.socket.SocketType) -> FastTCPServer:
    server = FastTCPServer(None, Config(), None, None, trio.SocketStream(sock), connections=set())
    server.protocol = RecordingProtocol()  # type: ignore[assignment]
    return server


async def test_a_write_the_socket_takes_whole_does_not_yield():
    """A response event that fits the socket buffer costs its task no scheduler pass
    (trio's ``send_all`` checkpoints after every write)."""
    ours, theirs = trio.socket.socketpair()
    with ours, theirs:
        server = connection_over(ours)
        with trio.testing.assert_no_checkpoints():
            await server.protocol_send(RawData(b"data: one\n\n"))
            await server.protocol_send(RawData(b"data: two\n\n"))
        assert await theirs.recv(100) == b"data: one\n\ndata: two\n\n"
        assert not server.send_lock.locked()


async def test_a_write_larger_than_the_socket_buffer_arrives_whole_and_in_order():
    ours, theirs = trio.socket.socketpair()
    with ours, theirs:
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        server = connection_over(ours)
        data = bytes(range(256)) * 4096  # 1 MiB, far more than the buffer
        received = bytearray()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.protocol_send, RawData(data))
            while len(received) < len(data):
                received += await theirs.recv(65536)
        assert received == data
        assert not server.send_lock.locked()


async def test_a_write_to_a_peer_that_is_gone_closes_the_protocol():
    ours, theirs = trio.socket.socketpair()
    with ours:
        theirs.close()
        server = connection_over(ours)
        await server.protocol_send(RawData(b"data: late\n\n"))
        assert any(isinstance(event, Closed) for event in server.protocol.events)
        assert not server.send_lock.locked()
