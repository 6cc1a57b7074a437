"""The probes, ``GET /health`` (liveness) and ``GET /ready`` (readiness): the one place that
lists their paths and builds their answers.

Both answers are functions of in-memory state only: no auth, no admission, no body, no
await on preparation or the engine. Three layers send them, all through this module:
``server.http_path`` answers them inside the HTTP/1.1 protocol under ``vlserve serve``
(no app task at all), ``server.probe_fast_path`` at the ASGI layer in front of Quart
(plain ``hypercorn``), and ``server.routes.health`` where a request reaches Quart itself
(the test client). Auth and admission exempt exactly ``UNGATED_PATHS``: the probes and
``GET /metrics``, which the same layers answer from ``ProbeResponder`` when it is given the
metrics' text (``server.metrics``); vLLM leaves ``/metrics`` open too.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from server.cors import CorsPolicy
from server.lifecycle import Phase, RuntimeLifecycle
from server.request_id import HEADER as REQUEST_ID_HEADER
from server.request_id import choose_request_id

PROBE_METHODS = frozenset({"GET", "HEAD"})
_REQUEST_ID_KEY = REQUEST_ID_HEADER.lower().encode()


@dataclass(frozen=True)
class ProbeAnswer:
    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = "application/json"


def _answer(status: int, phase: Phase, **headers: str) -> ProbeAnswer:
    body = json.dumps({"status": "ok" if status == 200 else "unavailable", "phase": phase.value})
    return ProbeAnswer(status, body.encode(), headers)


def health_answer(lifecycle: RuntimeLifecycle) -> ProbeAnswer:
    """200 while the process can make progress; 503 if the runtime failed, the event loop
    has not turned for more than ``--health-loop-stall`` seconds (read from the loop-lag
    monitor, so a probe answered off the loop still fails when the loop is stuck, as one
    waiting for the loop would time out), or the engine stopped making progress while it
    has work (or its worker process died). Safe to call from any thread."""
    runtime = lifecycle.runtime
    if lifecycle.phase is Phase.FAILED:
        return _answer(503, lifecycle.phase)
    stall_limit = lifecycle.config.health_loop_stall
    if stall_limit > 0 and lifecycle.loop_lag.stalled_for() > stall_limit:
        return _answer(503, lifecycle.phase)
    if runtime is not None and not runtime.engine.is_healthy():
        return _answer(503, lifecycle.phase)
    return _answer(200, lifecycle.phase)


def ready_answer(lifecycle: RuntimeLifecycle) -> ProbeAnswer:
    """200 while new requests are served; 503 while loading, draining or failed."""
    phase = lifecycle.phase
    if phase is Phase.READY:
        return _answer(200, phase)
    return _answer(503, phase, **{"Retry-After": "5" if phase is Phase.LOADING else "1"})


PROBES: dict[str, Callable[[RuntimeLifecycle], ProbeAnswer]] = {
    "/health": health_answer,
    "/ready": ready_answer,
}
PROBE_PATHS = frozenset(PROBES)
METRICS_PATH = "/metrics"
# answered without API keys, admission, or (under ``vlserve serve``) the app
UNGATED_PATHS = PROBE_PATHS | {METRICS_PATH}


@dataclass(frozen=True)
class ProbeReply:
    """A complete probe response: status, lower-case header pairs (no framing headers
    beyond ``content-length``) and the body (empty for ``HEAD``)."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


MetricsText = Callable[[], tuple[bytes, str]]


class ProbeResponder:
    """Builds probe replies with the same ``X-Request-Id`` and CORS headers as every other
    response. Synchronous: callers send the reply without any task of their own.

    With ``metrics`` (a function returning the exposition text and its content type),
    ``GET``/``HEAD`` ``/metrics`` is answered the same way."""

    def __init__(self, lifecycle: RuntimeLifecycle, cors: CorsPolicy, metrics: MetricsText | None = None) -> None:
        self._lifecycle = lifecycle
        self._cors = cors
        self._metrics = metrics

    def is_probe(self, method: str, path: str) -> bool:
        if method not in PROBE_METHODS:
            return False
        return path in PROBES or (path == METRICS_PATH and self._metrics is not None)

    def _answer(self, path: str) -> ProbeAnswer:
        if path == METRICS_PATH and self._metrics is not None:
            body, content_type = self._metrics()
            return ProbeAnswer(200, body, content_type=content_type)
        return PROBES[path](self._lifecycle)

    def reply(self, method: str, path: str, headers: Iterable[tuple[bytes, bytes]]) -> ProbeReply:
        """The reply to ``method path`` (which must satisfy ``is_probe``); ``headers`` are the
        request's, names in any case."""
        answer = self._answer(path)
        request_headers = {name.lower(): value for name, value in headers}
        presented = request_headers.get(_REQUEST_ID_KEY)
        request_id = choose_request_id(presented.decode("latin-1") if presented is not None else None)
        origin = request_headers.get(b"origin")
        cors = self._cors.response_headers(origin.decode("latin-1") if origin is not None else None)
        reply_headers = [
            (b"content-type", answer.content_type.encode()),
            (b"content-length", str(len(answer.body)).encode()),
            *((name.lower().encode(), value.encode()) for name, value in answer.headers.items()),
            (_REQUEST_ID_KEY, request_id.encode()),
            *((name.lower().encode(), value.encode()) for name, value in cors),
        ]
        return ProbeReply(answer.status, reply_headers, b"" if method == "HEAD" else answer.body)
