"""Minimal CORS for the configured origins: simple responses and preflights.

With no origins configured nothing is added. ``*`` allows any origin (credentials are
never allowed). Preflights are answered here, before auth, with 204.
"""

from __future__ import annotations

from collections.abc import Iterable

from quart import Quart, Response, request

ALLOWED_METHODS = "GET, POST, OPTIONS"
MAX_AGE_S = "600"


class CorsPolicy:
    def __init__(self, origins: Iterable[str]) -> None:
        self._origins = frozenset(origins)

    @property
    def origins(self) -> frozenset[str]:
        return self._origins

    @property
    def enabled(self) -> bool:
        return bool(self._origins)

    def allow_origin(self, origin: str | None) -> str | None:
        """The ``Access-Control-Allow-Origin`` value for ``origin``, or None to send none."""
        if origin is None:
            return None
        if "*" in self._origins:
            return "*"
        return origin if origin in self._origins else None

    def response_headers(self, origin: str | None) -> list[tuple[str, str]]:
        """The CORS headers every response to ``origin`` carries (none for others)."""
        allowed = self.allow_origin(origin)
        if allowed is None:
            return []
        headers = [
            ("Access-Control-Allow-Origin", allowed),
            ("Access-Control-Expose-Headers", "X-Request-Id, Retry-After"),
        ]
        if allowed != "*":
            headers.append(("Vary", "Origin"))
        return headers


def install_cors(app: Quart, policy: CorsPolicy) -> None:
    """Answer preflights and add CORS headers to responses (no-op without origins)."""
    if not policy.enabled:
        return

    async def preflight() -> Response | None:
        if request.method != "OPTIONS" or "Access-Control-Request-Method" not in request.headers:
            return None
        response = Response("", status=204)
        allowed = policy.allow_origin(request.headers.get("Origin"))
        if allowed is not None:
            response.headers["Access-Control-Allow-Methods"] = ALLOWED_METHODS
            response.headers["Access-Control-Allow-Headers"] = request.headers.get(
                "Access-Control-Request-Headers", "Authorization, Content-Type"
            )
            response.headers["Access-Control-Max-Age"] = MAX_AGE_S
        return response

    async def add_headers(response: Response) -> Response:
        for name, value in policy.response_headers(request.headers.get("Origin")):
            if name == "Vary":
                response.headers.add(name, value)  # keep any Vary already there
            else:
                response.headers[name] = value
        return response

    app.before_request(preflight)
    app.after_request(add_headers)
