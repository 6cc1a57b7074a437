"""A loopback image server that imitates a CDN: ``GET /<index>.jpg`` after a fixed latency.

    python -m bench.workloads.image_server --dir DIR --port PORT [--latency 0.05]

trio + h11, HTTP/1.1 keep-alive, one task per connection, so hundreds of concurrent fetches
are served at once. Files are read from ``DIR`` in a worker thread on first use and kept in
memory (the directory holds only what the benchmark made). ``GET /ping`` answers at once,
for readiness. Binds 127.0.0.1 only. Stops on SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import re
import signal
from functools import partial
from pathlib import Path

import h11
import trio

_RECEIVE_SIZE = 65536
_PEER_GONE = (trio.BrokenResourceError, trio.ClosedResourceError, h11.RemoteProtocolError)
_IMAGE_PATH = re.compile(r"^/(\d{1,9})\.jpg$")


class ImageFiles:
    """The image files of one directory, read once each. Event-loop only."""

    def __init__(self, directory: Path) -> None:
        self._directory = directory
        self._cache: dict[str, bytes] = {}

    async def get(self, name: str) -> bytes | None:
        """The bytes of ``name`` in the directory, or ``None`` if there is no such file.

        Cancellation: safe; a read already in its thread finishes and is cached.
        """
        data = self._cache.get(name)
        if data is None:
            path = trio.Path(self._directory / name)
            try:
                data = await path.read_bytes()
            except FileNotFoundError:
                return None
            self._cache[name] = data
        return data


async def serve_connection(stream: trio.SocketStream, *, files: ImageFiles, latency: float) -> None:
    """Answer requests on one keep-alive connection until the client closes it.

    Cancellation (server shutdown): the connection is closed at once.
    """
    connection = h11.Connection(h11.SERVER)
    try:
        while True:
            target = await _next_request(stream, connection)
            if target is None:
                return
            status, body = await _answer(target, files, latency)
            headers = [
                ("Content-Type", "image/jpeg" if status == 200 else "text/plain"),
                ("Content-Length", str(len(body))),
            ]
            for event in (h11.Response(status_code=status, headers=headers), h11.Data(data=body), h11.EndOfMessage()):
                await stream.send_all(connection.send(event))
            if connection.our_state is not h11.DONE or connection.their_state is not h11.DONE:
                return
            connection.start_next_cycle()
    except _PEER_GONE:
        return
    finally:
        await trio.aclose_forcefully(stream)


async def _answer(target: str, files: ImageFiles, latency: float) -> tuple[int, bytes]:
    if target == "/ping":
        return 200, b"ok"
    match = _IMAGE_PATH.match(target)
    if match is None:
        return 404, b"not found"
    await trio.sleep(latency)
    data = await files.get(f"{int(match.group(1))}.jpg")
    return (200, data) if data is not None else (404, b"not found")


async def _next_request(stream: trio.SocketStream, connection: h11.Connection) -> str | None:
    """The next request's target, its body read and dropped; ``None`` when the client closed."""
    target = None
    while True:
        event = connection.next_event()
        if event is h11.NEED_DATA:
            connection.receive_data(await stream.receive_some(_RECEIVE_SIZE))
        elif isinstance(event, h11.Request):
            target = event.target.decode("ascii", "replace")
        elif isinstance(event, h11.EndOfMessage):
            return target
        elif isinstance(event, h11.ConnectionClosed):
            return None


async def serve(directory: Path, port: int, latency: float) -> None:
    """Serve until SIGINT or SIGTERM arrives, then close every connection.

    Cancellation: every connection task is cancelled with the server's nursery.
    """
    files = ImageFiles(directory)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            handler = partial(serve_connection, files=files, latency=latency)
            await nursery.start(partial(trio.serve_tcp, handler, port, host="127.0.0.1"))
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, required=True, help="directory of <index>.jpg files")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--latency", type=float, default=0.05, help="seconds before each image response")
    args = parser.parse_args()
    trio.run(serve, args.dir, args.port, args.latency)


if __name__ == "__main__":
    main()
