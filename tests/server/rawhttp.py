"""Raw HTTP/1.x over a trio TCP stream, for tests that care about the connection itself."""

from __future__ import annotations

from urllib.parse import urlsplit

import trio


async def connect(base_url: str) -> trio.SocketStream:
    parts = urlsplit(base_url)
    return await trio.open_tcp_stream(parts.hostname, parts.port)


def request_bytes(
    method: str,
    path: str,
    *,
    version: str = "1.1",
    headers: dict[str, str] | None = None,
    body: bytes = b"",
) -> bytes:
    lines = [f"{method} {path} HTTP/{version}", "Host: test"]
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    if body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def read_until_eof(stream: trio.SocketStream, timeout: float) -> tuple[bytes, bool]:
    """Everything the server sends; ``True`` if it closed the connection within ``timeout``."""
    data = b""
    with trio.move_on_after(timeout):
        while True:
            chunk = await stream.receive_some()
            if not chunk:
                return data, True
            data += chunk
    return data, False


async def read_until(stream: trio.SocketStream, marker: bytes, timeout: float) -> bytes:
    """Read until ``marker`` has arrived (fails the test after ``timeout``)."""
    data = b""
    with trio.fail_after(timeout):
        while marker not in data:
            chunk = await stream.receive_some()
            if not chunk:
                raise AssertionError(f"EOF before {marker!r}; got {data!r}")
            data += chunk
    return data


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


async def read_one_response(stream: trio.SocketStream, timeout: float) -> bytes:
    """One response with a ``Content-Length`` body (keep-alive)."""
    data = await read_until(stream, b"\r\n\r\n", timeout)
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    with trio.fail_after(timeout):
        while len(body) < length:
            body += await stream.receive_some()
    return head + b"\r\n\r\n" + body
