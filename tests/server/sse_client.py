"""Parse a ``text/event-stream`` body the strict way: every event is ``data: ...\\n\\n``."""

from __future__ import annotations

import json
from typing import Any


def parse_events(body: str) -> tuple[list[dict[str, Any]], bool]:
    """The JSON events of ``body`` and whether it ended with ``data: [DONE]``.

    Fails (AssertionError) on anything that is not exactly a ``data:`` line plus a blank line.
    """
    assert body.endswith("\n\n"), body[-100:]
    raw_events = body[:-2].split("\n\n")
    done = raw_events[-1] == "data: [DONE]"
    if done:
        raw_events = raw_events[:-1]
    events = []
    for raw in raw_events:
        assert raw.startswith("data: ") and "\n" not in raw, raw
        assert raw != "data: [DONE]", "[DONE] before the end"
        events.append(json.loads(raw[len("data: ") :]))
    return events, done
