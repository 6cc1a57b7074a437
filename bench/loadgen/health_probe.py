"""Probe ``GET /health`` every ``interval`` seconds with two probers side by side: one on a
dedicated keep-alive connection, one opening a new TCP connection per probe (the way
Kubernetes probes: the server's accept and connection set-up are part of each probe).

    python -m bench.loadgen.health_probe http://127.0.0.1:PORT --out FILE [--interval 0.02]

Runs in its own process, so the load generator's own event loop and GIL never delay a
probe: what it measures is the server. A probe that takes longer than the interval delays
that prober's next one (one probe at a time per prober). Creates ``FILE`` with the suffix
``.started`` once the first keep-alive probe is answered. Stops on SIGINT/SIGTERM or after
``--max-seconds`` and then writes ``{"samples": [[sent, latency, status], ...],
"fresh_samples": [...]}`` to ``--out`` (keep-alive, then fresh-connection probes):
``sent`` on the system-wide ``time.monotonic`` clock, ``latency`` in seconds (connecting
included for fresh probes), ``status`` the HTTP status or 0 for a transport error or timeout.
"""

from __future__ import annotations

import argparse
import json
import signal
import time
import urllib.parse
from functools import partial
from pathlib import Path

import h11
import trio

PROBE_TIMEOUT = 30.0
_RECEIVE_SIZE = 16384


class HealthConnection:
    """One HTTP/1.1 keep-alive connection that sends ``GET /health`` (trio + h11: a few
    microseconds of client work per probe, so the latency measured is the server's);
    ``fresh`` closes it after every probe, so each probe opens a new one."""

    def __init__(self, host: str, port: int, *, fresh: bool = False) -> None:
        self._host, self._port = host, port
        self._fresh = fresh
        self._stream: trio.SocketStream | None = None
        self._conn: h11.Connection | None = None

    async def get(self) -> int:
        """The status of one ``GET /health``; (re)connects when needed.

        Raises ``OSError``/``trio.BrokenResourceError``/``h11.ProtocolError`` on failure
        (the connection is then dropped). Cancellation: the connection is dropped.
        """
        if self._stream is None:
            self._stream = await trio.open_tcp_stream(self._host, self._port)
            self._conn = h11.Connection(h11.CLIENT)
        try:
            request = h11.Request(method="GET", target="/health", headers=[("Host", f"{self._host}:{self._port}")])
            await self._stream.send_all(self._conn.send(request) + self._conn.send(h11.EndOfMessage()))
            status = 0
            while True:
                event = self._conn.next_event()
                if event is h11.NEED_DATA:
                    data = await self._stream.receive_some(_RECEIVE_SIZE)
                    if not data:
                        raise trio.BrokenResourceError("server closed the connection")
                    self._conn.receive_data(data)
                elif isinstance(event, h11.Response):
                    status = event.status_code
                elif isinstance(event, h11.EndOfMessage):
                    break
            if self._fresh:
                await self.close()
            elif self._conn.our_state is h11.DONE and self._conn.their_state is h11.DONE:
                self._conn.start_next_cycle()
            else:
                await self.close()
            return status
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        if self._stream is not None:
            stream, self._stream, self._conn = self._stream, None, None
            await trio.aclose_forcefully(stream)


async def probe(
    url: str,
    interval: float,
    samples: list[tuple[float, float, int]],
    started: Path | None = None,
    *,
    fresh: bool = False,
) -> None:
    """Append one sample per probe to ``samples`` until cancelled; create the file
    ``started`` (if given) once the first probe has been answered. ``fresh``: a new
    connection per probe.

    Cancellation: the probe in flight is dropped (not recorded) and the connection closed.
    """
    parts = urllib.parse.urlsplit(url)
    connection = HealthConnection(parts.hostname, parts.port or 80, fresh=fresh)
    try:
        due = trio.current_time()
        while True:
            sent = time.monotonic()
            status = 0
            with trio.move_on_after(PROBE_TIMEOUT):
                try:
                    status = await connection.get()
                except (OSError, trio.BrokenResourceError, h11.ProtocolError):
                    pass
            samples.append((sent, time.monotonic() - sent, status))
            if started is not None and status:
                started.touch()
                started = None
            due = max(due + interval, trio.current_time())
            await trio.sleep_until(due)
    finally:
        with trio.CancelScope(shield=True):
            await connection.close()


async def run(url: str, interval: float, max_seconds: float, out: Path) -> None:
    """Probe until SIGINT/SIGTERM or ``max_seconds``, then write ``out`` (and, from the first
    answered probe on, ``out`` with the suffix ``.started``). Cancellation: not expected
    (it is the process's main task); the samples so far would be lost."""
    samples: list[tuple[float, float, int]] = []
    fresh_samples: list[tuple[float, float, int]] = []
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        with trio.move_on_after(max_seconds):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(probe, url, interval, samples, out.with_suffix(".started"))
                nursery.start_soon(partial(probe, url, interval, fresh_samples, fresh=True))
                async for _ in signals:
                    break
                nursery.cancel_scope.cancel()
    staging = out.with_suffix(".partial")
    staging.write_text(
        json.dumps({"url": url, "interval": interval, "samples": samples, "fresh_samples": fresh_samples})
    )
    staging.replace(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("url")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--interval", type=float, default=0.02)
    parser.add_argument("--max-seconds", type=float, default=900.0)
    args = parser.parse_args()
    trio.run(run, args.url, args.interval, args.max_seconds, args.out)


if __name__ == "__main__":
    main()
