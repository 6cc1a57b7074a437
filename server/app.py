"""The app factory: ``create_app(config)`` returns a ready-to-serve QuartTrio app.

``hypercorn --worker-class trio 'server.app:create_app()'`` builds the configuration from
``VLSERVE_*`` environment variables. The model is loaded in the background once serving
starts (``/ready`` answers 503 until then) and closed when serving stops, after hypercorn
has finished (or given up on) the in-flight requests.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import trio
from quart_trio import QuartTrio

from server.access_log import AccessLog
from server.admission import Admission, install_admission
from server.auth import ApiKeys, install_auth
from server.config import ServerConfig
from server.connection_fix import ShieldedFinalSendConnection
from server.cors import CorsPolicy, install_cors
from server.errors import install_error_handlers
from server.lifecycle import RuntimeFactory, RuntimeLifecycle
from server.metrics import metrics_text
from server.options import config_from_env
from server.probe_fast_path import ProbeFastPath
from server.probes import ProbeResponder, facts_of
from server.request_id import install_request_id
from server.request_metrics import RequestMetrics
from server.request_observer import RequestObserver
from server.routes import register_routes
from server.state import ServerState, attach_state
from vl.gates import TimedBorrow

# A slow client may take this long to send one body (64 MiB at ~250 KB/s); Quart's
# default of 60 s would cut large image uploads. Responses get no timeout at all.
BODY_TIMEOUT_S = 300.0
# How long the runtime gets to close at shutdown before it is cancelled.
RUNTIME_CLOSE_TIMEOUT_S = 30.0
# Body decoding in worker threads is GIL-bound: one at a time (docs/architecture.md, "Processes and ownership").
PARSE_CONCURRENCY = 1


class VlserveApp(QuartTrio):
    """QuartTrio with the connection-close fix (see ``server.connection_fix``) and the
    probe replies (``probe_responder``) that ``server.http_path`` sends without the app."""

    asgi_http_class = ShieldedFinalSendConnection
    probe_responder: ProbeResponder


@asynccontextmanager
async def open_default_runtime(config: ServerConfig) -> AsyncIterator[Any]:
    """``server.runtime.open_runtime(config)``.

    The runtime's modules (torch, transformers) are imported in a worker thread the
    first time, so the event loop keeps answering ``/health`` meanwhile.
    """
    runtime_module = await trio.to_thread.run_sync(importlib.import_module, "server.runtime")
    async with runtime_module.open_runtime(config) as runtime:
        yield runtime


def create_app(config: ServerConfig | None = None, *, runtime_factory: RuntimeFactory | None = None) -> VlserveApp:
    """Build the app for ``config`` (default: from the environment).

    ``runtime_factory(config)`` must return an async context manager yielding a
    ``server.runtime.Runtime``-like object; the default opens the real model.
    """
    if config is None:
        config = config_from_env(os.environ)
    app = VlserveApp(__name__)
    app.config.update(
        RESPONSE_TIMEOUT=None,
        BODY_TIMEOUT=BODY_TIMEOUT_S,
        MAX_CONTENT_LENGTH=config.max_body_bytes,
        BACKGROUND_TASK_SHUTDOWN_TIMEOUT=RUNTIME_CLOSE_TIMEOUT_S,
        PROPAGATE_EXCEPTIONS=False,
    )
    lifecycle = RuntimeLifecycle(config, runtime_factory or open_default_runtime)
    request_metrics = RequestMetrics()
    state = ServerState(
        config=config,
        lifecycle=lifecycle,
        admission=Admission(config.max_concurrent_requests),
        # each wait for a parse thread counts in vlserve_gate_wait_seconds{gate="parse"}
        parse_limiter=TimedBorrow(
            trio.CapacityLimiter(PARSE_CONCURRENCY), on_wait=partial(request_metrics.observe_gate_wait, "parse")
        ),
        request_metrics=request_metrics,
    )
    attach_state(app, state)
    install_request_id(app)
    install_error_handlers(app)
    cors = CorsPolicy(config.cors_allow_origins)
    install_cors(app, cors)
    install_auth(app, ApiKeys(config.api_keys))
    install_admission(app, state.admission)
    access_log = AccessLog() if config.access_log else None
    app.asgi_app = RequestObserver(app.asgi_app, state.request_metrics, access_log)  # type: ignore[method-assign]
    register_routes(app)
    app.probe_responder = ProbeResponder(partial(facts_of, lifecycle), cors, metrics=lambda: metrics_text(state))
    app.asgi_app = ProbeFastPath(app.asgi_app, app.probe_responder)  # type: ignore[method-assign]

    async def start_runtime() -> None:
        app.nursery.start_soon(lifecycle.run)

    async def stop_runtime() -> None:
        lifecycle.stop()
        await lifecycle.wait_closed()

    app.before_serving(start_runtime)
    app.after_serving(stop_runtime)
    return app
