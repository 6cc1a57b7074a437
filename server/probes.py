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
from typing import TYPE_CHECKING

from server.cors import CorsPolicy
from server.lifecycle import Phase
from server.request_id import HEADER as REQUEST_ID_HEADER
from server.request_id import choose_request_id

if TYPE_CHECKING:
    from server.lifecycle import RuntimeLifecycle

PROBE_METHODS = frozenset({"GET", "HEAD"})
_REQUEST_ID_KEY = REQUEST_ID_HEADER.lower().encode()


@dataclass(frozen=True)
class ProbeAnswer:
    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = "application/json"


@dataclass(frozen=True)
class ProbeFacts:
    """What the probes' answers are made of, read at one moment: the lifecycle's phase,
    how long the event loop has gone without turning past its monitor's interval, the
    stall limit (``--health-loop-stall``, 0: never), and whether the engine makes progress.
    ``RuntimeLifecycle.probe_facts`` reads them in the server process; a probe-lane
    process reads the copy the server publishes (``server.http_path.probe_board``)."""

    phase: Phase
    loop_stalled_for: float
    stall_limit: float
    engine_healthy: bool


def facts_of(lifecycle: RuntimeLifecycle) -> ProbeFacts:
    """The probes' facts in the server process, now. Safe to call from any thread: a few
    attribute reads, and the engine's ``is_healthy``."""
    runtime = lifecycle.runtime
    return ProbeFacts(
        phase=lifecycle.phase,
        loop_stalled_for=lifecycle.loop_lag.stalled_for(),
        stall_limit=lifecycle.config.health_loop_stall,
        engine_healthy=runtime is None or runtime.engine.is_healthy(),
    )


def _answer(status: int, phase: Phase, **headers: str) -> ProbeAnswer:
    body = json.dumps({"status": "ok" if status == 200 else "unavailable", "phase": phase.value})
    return ProbeAnswer(status, body.encode(), headers)


def health_answer(facts: ProbeFacts) -> ProbeAnswer:
    """200 while the process can make progress; 503 if the runtime failed, the event loop
    has not turned for more than ``--health-loop-stall`` seconds (read from the loop-lag
    monitor, so a probe answered off the loop still fails when the loop is stuck, as one
    waiting for the loop would time out), or the engine stopped making progress while it
    has work (or its worker process died)."""
    if facts.phase is Phase.FAILED:
        return _answer(503, facts.phase)
    if facts.stall_limit > 0 and facts.loop_stalled_for > facts.stall_limit:
        return _answer(503, facts.phase)
    if not facts.engine_healthy:
        return _answer(503, facts.phase)
    return _answer(200, facts.phase)


def ready_answer(facts: ProbeFacts) -> ProbeAnswer:
    """200 while new requests are served; 503 while loading, draining or failed."""
    phase = facts.phase
    if phase is Phase.READY:
        return _answer(200, phase)
    return _answer(503, phase, **{"Retry-After": "5" if phase is Phase.LOADING else "1"})


PROBES: dict[str, Callable[[ProbeFacts], ProbeAnswer]] = {
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

    def __init__(self, facts: Callable[[], ProbeFacts], cors: CorsPolicy, metrics: MetricsText | None = None) -> None:
        """``facts()`` is read once per reply (from any thread: it must be safe there)."""
        self._facts = facts
        self._cors = cors
        self._metrics = metrics

    @property
    def cors(self) -> CorsPolicy:
        return self._cors

    def facts(self) -> ProbeFacts:
        """The facts the next reply would be made of."""
        return self._facts()

    def is_probe(self, method: str, path: str) -> bool:
        if method not in PROBE_METHODS:
            return False
        return path in PROBES or (path == METRICS_PATH and self._metrics is not None)

    def _answer(self, path: str) -> ProbeAnswer:
        if path == METRICS_PATH and self._metrics is not None:
            body, content_type = self._metrics()
            return ProbeAnswer(200, body, content_type=content_type)
        return PROBES[path](self._facts())

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
