"""Bearer API keys, compared in constant time. Probes, ``/metrics`` and CORS preflights are exempt."""

from __future__ import annotations

import hmac
from collections.abc import Iterable

from quart import Quart, request

from server.errors import unauthorized
from server.probes import UNGATED_PATHS

EXEMPT_PATHS = UNGATED_PATHS


class ApiKeys:
    """The accepted keys. With none configured, every request is allowed."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._keys = tuple(k.encode() for k in keys if k)

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def accepts(self, presented: str) -> bool:
        """Whether ``presented`` is one of the keys; compares against every key, always."""
        candidate = presented.encode()
        matched = False
        for key in self._keys:
            matched |= hmac.compare_digest(candidate, key)
        return matched


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, else ``None``."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def install_auth(app: Quart, keys: ApiKeys) -> None:
    """Require a valid Bearer key on every route but the probes and ``/metrics`` (no-op without keys)."""
    if not keys.enabled:
        return

    async def check_api_key() -> None:
        if request.path in EXEMPT_PATHS or request.method == "OPTIONS":
            return
        token = bearer_token(request.headers.get("Authorization"))
        if token is None:
            raise unauthorized(
                "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.",
                "missing_api_key",
            )
        if not keys.accepts(token):
            raise unauthorized("Incorrect API key provided.", "invalid_api_key")

    app.before_request(check_api_key)
