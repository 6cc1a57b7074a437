"""Readiness checks by HTTP: ``/ready`` where a server has it, else ``/health``."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import httpx


def http_ready(base_url: str, *, paths: tuple[str, ...] = ("/ready", "/health")) -> Callable[[], Awaitable[bool]]:
    """A check that is True when the first of ``paths`` the server knows answers 200.

    A path answering 404 is skipped (the server does not have it); any other status, or a
    refused connection, means not ready yet.
    """

    async def check() -> bool:
        async with httpx.AsyncClient(base_url=base_url, timeout=2.0) as client:
            for path in paths:
                try:
                    status = (await client.get(path)).status_code
                except httpx.HTTPError:
                    return False
                if status != 404:
                    return status == 200
            return False

    return check
