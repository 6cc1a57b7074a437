"""Hypercorn's configuration for a ``ServerConfig``."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from hypercorn.config import Config

from server.config import ServerConfig
from server.options import ConfigError

# Listen backlog: hypercorn's default of 100 overflows when a burst of a few hundred clients
# connects at once while the event loop is busy (a connection reset seen once in a
# 256-request image burst); 2048 is uvicorn's default.
LISTEN_BACKLOG = 2048


def bind_address(host: str, port: int) -> str:
    """``host:port``, with IPv6 hosts in brackets."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


def hypercorn_config(config: ServerConfig, overrides: Mapping[str, Any] | None = None) -> Config:
    """Bind, drain timeout, listen backlog and logging from ``config``; then ``overrides`` (hypercorn
    attribute names, e.g. ``keep_alive_timeout``). Unknown names raise ``ConfigError``."""
    hyper = Config()
    hyper.bind = [bind_address(config.host, config.port)]
    hyper.graceful_timeout = config.drain_timeout
    hyper.backlog = LISTEN_BACKLOG
    hyper.errorlog = logging.getLogger("hypercorn.error")
    hyper.accesslog = None
    for name, value in (overrides or {}).items():
        if not hasattr(hyper, name):
            raise ConfigError(f"hypercorn has no setting {name!r}")
        setattr(hyper, name, value)
    return hyper
