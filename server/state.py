"""Everything the routes share for one app instance, kept on the app (not in a module)."""

from __future__ import annotations

from dataclasses import dataclass, field

import trio
from quart import Quart, current_app

from server.admission import Admission
from server.config import ServerConfig
from server.lifecycle import RuntimeLifecycle
from server.request_metrics import RequestMetrics
from server.structured_output import GrammarValidator
from vl.gates import TimedBorrow

EXTENSION_KEY = "vlserve"


@dataclass
class ServerState:
    """Per-app state.

    ``parse_limiter`` gates JSON decoding and validation of large bodies, which run in a
    worker thread so that a 64 MiB base64 body does not stall the event loop.
    ``request_metrics`` is what requests report as they run (``server.request_observer``).
    ``grammars`` builds and caches the grammars of structured output (``server.structured_output``).
    """

    config: ServerConfig
    lifecycle: RuntimeLifecycle
    admission: Admission
    parse_limiter: trio.CapacityLimiter | TimedBorrow
    request_metrics: RequestMetrics = field(default_factory=RequestMetrics)
    grammars: GrammarValidator = field(default_factory=GrammarValidator)


def attach_state(app: Quart, state: ServerState) -> None:
    app.extensions[EXTENSION_KEY] = state


def state_of(app: Quart) -> ServerState:
    """The state ``create_app`` attached to ``app``."""
    return app.extensions[EXTENSION_KEY]


def current_state() -> ServerState:
    """The state of the app handling the current request."""
    return state_of(current_app)
