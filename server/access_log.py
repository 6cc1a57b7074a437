"""The access log: one line per API request, plain or JSON, on the ``vlserve.access`` logger.

A line is written by ``server.request_observer`` in the request's own task once the last
byte of the response has been handed to the connection (or the request was cut): a
formatted ``logging`` call, no task of its own and nothing awaited. The fields are
``RequestRecord.summary()``: request id, method, path, status, whether the response was
sent whole, prompt and completion tokens, images, time to prompt ready, time to first
token and total time (milliseconds from arrival), finish reasons, and for a chat the
preparation breakdown (``fetch_ms``, ``decode_ms``, ``preprocess_ms``, ``tokenize_ms``,
``gate_wait_ms``: ``vl.prep_timings``; ``-`` for other requests).

``--log-format json`` (``server.cli``) makes every log line, this one included, a JSON
object (``JsonLineFormatter``); the access fields are then top-level keys.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson

LOGGER_NAME = "vlserve.access"
FIELDS_ATTRIBUTE = "access"


def plain_line(fields: dict[str, Any]) -> str:
    """``<id> <METHOD> <path> <status> key=value ...`` (``-`` for a missing value)."""
    head = f"{fields['request_id']} {fields['method']} {fields['path']} {fields['status'] or '-'}"
    rest = " ".join(
        f"{name}={'-' if value is None else value}"
        for name, value in fields.items()
        if name not in ("request_id", "method", "path", "status")
    )
    return f"{head} {rest}"


class AccessLog:
    """Writes access lines to ``LOGGER_NAME`` at INFO (nothing when that level is off)."""

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self._logger = logger or logging.getLogger(LOGGER_NAME)

    def write(self, fields: dict[str, Any]) -> None:
        if self._logger.isEnabledFor(logging.INFO):
            self._logger.info(plain_line(fields), extra={FIELDS_ATTRIBUTE: fields})


class JsonLineFormatter(logging.Formatter):
    """One JSON object per record: ``time``, ``level``, ``logger``, ``message`` (and
    ``exc_info`` text), plus the access fields of an access-log record as top-level keys."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
        }
        fields = getattr(record, FIELDS_ATTRIBUTE, None)
        if fields is not None:
            line.update(fields)
        else:
            line["message"] = record.getMessage()
        if record.exc_info:
            line["exc_info"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()
