"""An ASGI wrapper that follows each API request from arrival to its last byte.

It puts a ``RequestRecord`` in the ASGI scope (``current_record()`` finds it from a
route), notes the response status and ``X-Request-Id`` as the response starts, and when
the request is over, however it ended, finishes the record (``server.request_metrics``)
and writes the access-log line (``server.access_log``). All of it runs in the request's
own task, synchronously: no task, lock or await of its own. Probes and ``/metrics``
are not followed (they are answered before the app under ``vlserve serve``).
"""

from __future__ import annotations

from typing import Any

from quart import request

from server.access_log import AccessLog
from server.probes import UNGATED_PATHS
from server.request_id import HEADER as REQUEST_ID_HEADER
from server.request_metrics import RequestMetrics, RequestRecord

RECORD_KEY = "vlserve.record"
_REQUEST_ID_KEY = REQUEST_ID_HEADER.lower().encode()


def current_record() -> RequestRecord | None:
    """The record of the request being handled (``None`` if it is not followed)."""
    return request.scope.get(RECORD_KEY)


class RequestObserver:
    """See the module docstring. ``access_log=None`` writes no access lines."""

    def __init__(self, app: Any, metrics: RequestMetrics, access_log: AccessLog | None) -> None:
        self._app = app
        self._metrics = metrics
        self._access_log = access_log

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        """Run the request with a record in its scope.

        Cancellation: the record is finished and logged (as not complete) on the way out.
        """
        if scope["type"] != "http" or scope.get("path") in UNGATED_PATHS:
            await self._app(scope, receive, send)
            return
        record = RequestRecord(scope["method"], scope.get("path", ""), self._metrics)
        scope[RECORD_KEY] = record

        async def observed_send(message: Any) -> None:
            kind = message["type"]
            if kind == "http.response.start":
                record.status = message["status"]
                for name, value in message.get("headers", ()):
                    if name.lower() == _REQUEST_ID_KEY:
                        record.request_id = value.decode("latin-1")
            await send(message)
            if kind == "http.response.body" and not message.get("more_body", False):
                record.complete = True

        try:
            await self._app(scope, receive, observed_send)
        finally:
            record.finish()
            if self._access_log is not None:
                self._access_log.write(record.summary())
