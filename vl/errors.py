"""Input errors raised below the HTTP layer; ``server`` turns them into OpenAI error JSON."""

from __future__ import annotations


class InvalidRequest(Exception):
    """The client sent something we will not serve. Maps to HTTP 400 ``invalid_request_error``.

    ``param`` names the offending request field (e.g. ``messages[0].content[1].image_url``),
    ``code`` is a short machine-readable reason, or ``None``.
    """

    status = 400

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class MediaError(InvalidRequest):
    """An image could not be fetched, decoded or accepted (limits, SSRF policy, bad bytes)."""


class MediaTimeout(MediaError):
    """Fetching an image took longer than the configured timeout. Still a client-side 400."""
