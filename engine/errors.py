"""Errors the engine raises for callers to recognise (no torch import here).

The engine names what it refuses in its own terms (``kind``, and the part of the request:
``"prompt"``, ``"images"`` or a ``SamplingParams`` field); the HTTP layer maps those to
OpenAI error JSON and its parameter names (``server.errors.invalid_request_from_engine``).
"""

from __future__ import annotations


class ModelLoadError(Exception):
    """The model directory cannot be served; the message is one line for the user."""


class RequestRejected(Exception):
    """The engine will not run this request; the message is meant for the client.

    ``kind`` is a short machine-readable reason (``"context_length_exceeded"``,
    ``"images_not_supported"``, ``"empty_prompt"``, ``"image_token_mismatch"``,
    ``"invalid_sampling_param"``); ``subject`` is the part of the request at fault:
    ``"prompt"``, ``"images"``, or a ``SamplingParams`` field name.
    """

    def __init__(self, message: str, *, kind: str, subject: str) -> None:
        super().__init__(message)
        self.message = message
        self.kind = kind
        self.subject = subject


class SamplingParamError(RequestRejected):
    """A ``SamplingParams`` field out of range: ``subject`` is the field, ``rule`` what it
    must be (``"must be in (0, 1]"``)."""

    def __init__(self, field: str, rule: str) -> None:
        super().__init__(f"'{field}' {rule}.", kind="invalid_sampling_param", subject=field)
        self.rule = rule
