"""A do-nothing HTTP server: the machine's probe floor at the moment of a burst.

    python -m bench.floor_server --port PORT

Answers every request with ``200 {"status":"ok"}`` straight from a ``trio.serve_tcp``
handler (one read, one write, no framework, no tasks of its own), keep-alive or not. It
runs in a process of its own beside the server under test, probed by a prober of its own:
whatever its probes take during a burst is what the machine (two cores shared by the
server, its engine worker, the load generator and the probers) costs any server at that
moment, so a server's probe figures are read as multiples of this one's.

Stops on SIGINT/SIGTERM or after ``--max-seconds``.
"""

from __future__ import annotations

import argparse
import signal
from functools import partial

import trio

_RECEIVE_SIZE = 16384
_BODY = b'{"status":"ok"}'
_KEEP_ALIVE = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(_BODY), _BODY)
_CLOSE = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%s" % (
    len(_BODY),
    _BODY,
)
_MAX_HEAD = 64 * 1024


def _wants_close(head: bytes) -> bool:
    lowered = head.lower()
    return b"connection: close" in lowered or lowered.split(b"\r\n", 1)[0].endswith(b"http/1.0")


async def handle(stream: trio.SocketStream) -> None:
    """Answer each request head on ``stream`` (bodies are not expected: probes are GETs).

    Cancellation: the connection is closed."""
    buffer = b""
    try:
        while True:
            data = await stream.receive_some(_RECEIVE_SIZE)
            if not data:
                return
            buffer += data
            if len(buffer) > _MAX_HEAD:
                return
            while b"\r\n\r\n" in buffer:
                head, buffer = buffer.split(b"\r\n\r\n", 1)
                close = _wants_close(head)
                await stream.send_all(_CLOSE if close else _KEEP_ALIVE)
                if close:
                    return
    except trio.BrokenResourceError:
        return
    finally:
        await trio.aclose_forcefully(stream)


async def serve(port: int, max_seconds: float) -> None:
    """Serve on 127.0.0.1:``port`` until a signal or ``max_seconds``."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        with trio.move_on_after(max_seconds):
            async with trio.open_nursery() as nursery:
                await nursery.start(partial(trio.serve_tcp, handle, port, host="127.0.0.1"))
                async for _ in signals:
                    break
                nursery.cancel_scope.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--max-seconds", type=float, default=3600.0)
    args = parser.parse_args()
    trio.run(serve, args.port, args.max_seconds)


if __name__ == "__main__":
    main()
