"""Probe ``GET /health`` every ``interval`` seconds on one dedicated keep-alive connection.

    python -m bench.loadgen.health_probe http://127.0.0.1:PORT --out FILE [--interval 0.02]

Runs in its own process, so the load generator's own event loop and GIL never delay a
probe: what it measures is the server. A probe that takes longer than the interval delays
the next one (one connection, one probe at a time). Stops on SIGINT/SIGTERM or after
``--max-seconds`` and then writes ``{"samples": [[sent, latency, status], ...]}`` to
``--out``: ``sent`` on the system-wide ``time.monotonic`` clock, ``latency`` in seconds,
``status`` the HTTP status or 0 for a transport error or timeout.
"""

from __future__ import annotations

import argparse
import json
import signal
import time
from pathlib import Path

import httpx
import trio

PROBE_TIMEOUT = 30.0


async def probe(url: str, interval: float, samples: list[tuple[float, float, int]]) -> None:
    """Append one sample per probe to ``samples`` until cancelled.

    Cancellation: the probe in flight is dropped (not recorded) and the connection closed.
    """
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=PROBE_TIMEOUT) as client:
        due = trio.current_time()
        while True:
            sent = time.monotonic()
            try:
                status = (await client.get("/health")).status_code
            except httpx.HTTPError:
                status = 0
            samples.append((sent, time.monotonic() - sent, status))
            due = max(due + interval, trio.current_time())
            await trio.sleep_until(due)


async def run(url: str, interval: float, max_seconds: float, out: Path) -> None:
    samples: list[tuple[float, float, int]] = []
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        with trio.move_on_after(max_seconds):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(probe, url, interval, samples)
                async for _ in signals:
                    break
                nursery.cancel_scope.cancel()
    staging = out.with_suffix(".partial")
    staging.write_text(json.dumps({"url": url, "interval": interval, "samples": samples}))
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
