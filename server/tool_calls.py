"""The model's text as OpenAI tool calls: whole, or delta by delta while it streams.

What the model writes depends on ``tool_choice`` (``ToolMode``):

- ``auto``: free text in which each call is a Hermes/Qwen block
  ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` (the form the default tool
  prompt asks for, ``vl.tool_prompt``). The blocks become ``tool_calls``; the text around
  them is the content (``null`` if only whitespace). A block that is not such JSON, or one
  left open when generation ended, stays in the content as written, as vLLM's Hermes
  parser does. With ``parallel_tool_calls: false`` only the first call is kept.
- ``required``: a JSON array ``[{"name": ..., "parameters": {...}}, ...]``, which
  constrained decoding guarantees (``server.structured_output``).
- ``named``: the JSON arguments of the one named function, also constrained.
- ``none``: no parsing; the text is the content.

Calls get ids ``call_`` + 24 hex digits. ``finish_reason`` becomes ``"tool_calls"`` when
``auto`` or ``required`` produced calls and generation stopped on its own (a call
``named`` by the request finishes with ``"stop"``, as OpenAI does).
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Any, Literal

CALL_OPEN = "<tool_call>"
CALL_CLOSE = "</tool_call>"
Mode = Literal["none", "auto", "required", "named"]


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


@dataclass(frozen=True)
class ParsedCall:
    id: str
    name: str
    arguments: str  # JSON text

    def out(self) -> dict[str, Any]:
        """The call as a ``message.tool_calls`` entry."""
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def call_from_json(text: str, arguments_key: str = "arguments") -> ParsedCall | None:
    """A call from ``{"name": ..., <arguments_key>: {...}}``, or ``None`` if ``text`` is not that."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get(arguments_key, {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ParsedCall(new_call_id(), value["name"], json.dumps(arguments, ensure_ascii=False))


@dataclass(frozen=True)
class ToolMode:
    """How one request's output is read: the mode, the function a ``named`` choice
    forces, and whether ``auto`` may keep several calls."""

    mode: Mode = "none"
    function: str | None = None
    parallel: bool = True

    def parse(self, text: str, finish_reason: str) -> tuple[str | None, list[ParsedCall], str]:
        """The content, the calls and the finish reason of a whole output."""
        stream = ToolStream(self)
        events = stream.feed(text) + stream.finish()
        content = "".join(e for e in events if isinstance(e, str))
        calls = [e for e in events if isinstance(e, ParsedCall)]
        return self._content(content, calls), calls, stream.finish_reason(finish_reason)

    def _content(self, content: str, calls: list[ParsedCall]) -> str | None:
        if calls and not content.strip():
            return None
        return content.strip() if calls else content


class ToolStream:
    """Reads one choice's text delta by delta: ``feed`` and ``finish`` return, in order,
    content text (``str``) and complete calls (``ParsedCall``). ``auto`` holds back only
    text that may still open or continue a call block, so plain content streams at once;
    ``named`` reports its call's id and name first (``started``) and its argument text as
    it comes (``argument_fragments``)."""

    def __init__(self, mode: ToolMode) -> None:
        self.mode = mode
        self._buffer = ""
        self._calls = 0
        self.named_call: ParsedCall | None = None

    def feed(self, text: str) -> list[str | ParsedCall]:
        if self.mode.mode == "none":
            return [text] if text else []
        self._buffer += text
        if self.mode.mode == "auto":
            return self._scan(final=False)
        return []

    def finish(self) -> list[str | ParsedCall]:
        """Everything still held, at the end of the output."""
        if self.mode.mode == "auto":
            return self._scan(final=True)
        if self.mode.mode == "required":
            calls = _required_calls(self._buffer)
            if calls is None:
                return [self._take()]
            if not self.mode.parallel:
                calls = calls[:1]
            self._calls += len(calls)
            self._buffer = ""
            return list(calls)
        if self.mode.mode == "named":
            self._calls = 1
            return [ParsedCall(self.named_id, self.mode.function or "", self._take())]
        return []

    @property
    def named_id(self) -> str:
        if self.named_call is None:
            self.named_call = ParsedCall(new_call_id(), self.mode.function or "", "")
        return self.named_call.id

    def finish_reason(self, engine_reason: str) -> str:
        if self._calls and engine_reason == "stop" and self.mode.mode in ("auto", "required"):
            return "tool_calls"
        return engine_reason

    def _take(self) -> str:
        text, self._buffer = self._buffer, ""
        return text

    def _scan(self, final: bool) -> list[str | ParsedCall]:
        events: list[str | ParsedCall] = []
        while self._buffer:
            start = self._buffer.find(CALL_OPEN)
            if start < 0:
                keep = 0 if final else _partial_suffix(self._buffer, CALL_OPEN)
                text = self._buffer[: len(self._buffer) - keep]
                self._buffer = self._buffer[len(self._buffer) - keep :]
                if text:
                    events.append(text)
                break
            if start:
                events.append(self._buffer[:start])
                self._buffer = self._buffer[start:]
            end = self._buffer.find(CALL_CLOSE)
            if end < 0:
                if final:
                    events.append(self._take())
                break
            block = self._buffer[: end + len(CALL_CLOSE)]
            self._buffer = self._buffer[end + len(CALL_CLOSE) :]
            call = call_from_json(block[len(CALL_OPEN) : end].strip())
            if call is None:
                events.append(block)
            elif self.mode.parallel or self._calls == 0:
                self._calls += 1
                events.append(call)
        return events


def _partial_suffix(text: str, marker: str) -> int:
    """The length of the longest suffix of ``text`` that is a proper prefix of ``marker``."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0


def _required_calls(text: str) -> list[ParsedCall] | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if not isinstance(value, list) or not value:
        return None
    calls = [call_from_json(json.dumps(item), arguments_key="parameters") for item in value]
    return None if any(c is None for c in calls) else calls  # type: ignore[return-value]
