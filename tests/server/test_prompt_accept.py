"""``PromptAcceptListener``: a waiting connection is accepted without a scheduler pass."""

from __future__ import annotations

import socket

import pytest
import trio
import trio.testing

from server.http_path.serve import PromptAcceptListener


def _listening_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    return sock


@pytest.mark.parametrize("prompt", [True, False], ids=["prompt", "trio"])
async def test_waiting_connection_is_accepted_without_a_checkpoint(prompt):
    """With a connection already in the kernel's queue, ``accept`` returns in the same
    scheduler pass; trio's own listener yields once more (so that case must fail)."""
    sock = _listening_socket()
    listener = PromptAcceptListener(sock) if prompt else trio.SocketListener(trio.socket.from_stdlib_socket(sock))
    async with listener:
        client = socket.create_connection(sock.getsockname(), timeout=5)
        with client:
            client.sendall(b"ping")
            try:
                with trio.testing.assert_no_checkpoints():
                    stream = await listener.accept()
            except AssertionError:
                assert not prompt, "PromptAcceptListener yielded with a connection waiting"
                return
            assert prompt, "trio's SocketListener no longer yields after accept: PromptAcceptListener may go"
            async with stream:
                assert await stream.receive_some(4) == b"ping"


async def test_accept_waits_for_a_connection_and_closing_wakes_it():
    """With nothing waiting, ``accept`` blocks (a checkpoint) until a client connects;
    closing the listener wakes a blocked ``accept`` with ``ClosedResourceError``."""
    sock = _listening_socket()
    listener = PromptAcceptListener(sock)
    accepted: list[trio.SocketStream] = []
    async with trio.open_nursery() as nursery:

        async def accept_one() -> None:
            accepted.append(await listener.accept())

        nursery.start_soon(accept_one)
        await trio.testing.wait_all_tasks_blocked()
        assert not accepted
        client = socket.create_connection(sock.getsockname(), timeout=5)
    assert len(accepted) == 1
    await accepted[0].aclose()
    client.close()

    async with trio.open_nursery() as nursery:
        errors: list[BaseException] = []

        async def accept_until_closed() -> None:
            try:
                await listener.accept()
            except trio.ClosedResourceError as exc:
                errors.append(exc)

        nursery.start_soon(accept_until_closed)
        await trio.testing.wait_all_tasks_blocked()
        await listener.aclose()
    assert len(errors) == 1
    with pytest.raises(trio.ClosedResourceError):
        await listener.accept()
