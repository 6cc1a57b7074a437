"""Bounded admission: at most N requests in flight, refused with 503 beyond that.

The count is taken in an ASGI wrapper around the whole request, so a slot is held from
before routing until the last byte of a (streamed) response is sent, and is given back
however the request ends: response done, client gone, handler cancelled. The wrapper
only records whether the request got a slot; a ``before_request`` hook (registered after
auth) turns "no slot" into the 503, before any body is read or any preparation starts.
Liveness/readiness probes, ``/metrics`` and CORS preflights never take a slot and are never
refused.

The same wrapper releases what a handler holds for the request's whole life
(``hold_until_request_ends``): e.g. the pixel slots of a prepared prompt, which a streamed
response still needs after its handler has returned.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import trio
from quart import Quart, request

from server.errors import unavailable
from server.probes import UNGATED_PATHS

ADMITTED_KEY = "vlserve.admitted"
HELD_KEY = "vlserve.held_until_end"
EXEMPT_PATHS = UNGATED_PATHS
RETRY_AFTER_S = 1

AsgiApp = Callable[[Any, Any, Any], Awaitable[None]]


@dataclass(frozen=True)
class AdmissionStatistics:
    limit: int
    in_flight: int
    refused: int


class Admission:
    """Counts requests in flight against ``limit``; a ``trio.CapacityLimiter`` does the count."""

    def __init__(self, limit: int) -> None:
        self._limiter = trio.CapacityLimiter(limit)
        self._refused = 0

    def try_admit(self, token: object) -> bool:
        """Take a slot for ``token`` if one is free, without waiting."""
        try:
            self._limiter.acquire_on_behalf_of_nowait(token)
        except trio.WouldBlock:
            self._refused += 1
            return False
        return True

    def release(self, token: object) -> None:
        self._limiter.release_on_behalf_of(token)

    def statistics(self) -> AdmissionStatistics:
        return AdmissionStatistics(
            limit=int(self._limiter.total_tokens),
            in_flight=self._limiter.borrowed_tokens,
            refused=self._refused,
        )


def needs_admission(scope: Any) -> bool:
    return scope.get("type") == "http" and scope.get("path") not in EXEMPT_PATHS and scope.get("method") != "OPTIONS"


class AdmissionMiddleware:
    """ASGI wrapper holding one admission slot per request for the request's whole life."""

    def __init__(self, app: AsgiApp, admission: Admission) -> None:
        self._app = app
        self._admission = admission

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        """Run the request with ``scope[ADMITTED_KEY]`` set to whether it got a slot.

        Cancellation: the slot is released whatever way the request ends.
        """
        if not needs_admission(scope):
            await self._app(scope, receive, send)
            return
        token = object()
        admitted = self._admission.try_admit(token)
        scope[ADMITTED_KEY] = admitted
        with ExitStack() as held:
            scope[HELD_KEY] = held
            try:
                await self._app(scope, receive, send)
            finally:
                if admitted:
                    self._admission.release(token)


def hold_until_request_ends(release: Callable[[], None]) -> None:
    """Call ``release()`` when the current request ends, whichever way (response sent,
    streamed or not; client gone; handler cancelled or failed): after its response's last
    byte, in the admission wrapper's ``finally``. Only for admitted requests' handlers."""
    request.scope[HELD_KEY].callback(release)


async def _refuse_if_not_admitted() -> None:
    if request.scope.get(ADMITTED_KEY) is False:
        raise unavailable("The server is overloaded; please retry shortly.", "overloaded", RETRY_AFTER_S)


def install_admission(app: Quart, admission: Admission) -> None:
    """Wrap ``app``'s ASGI entry and refuse unadmitted requests; call after ``install_auth``."""
    app.asgi_app = AdmissionMiddleware(app.asgi_app, admission)  # type: ignore[method-assign]
    app.before_request(_refuse_if_not_admitted)
