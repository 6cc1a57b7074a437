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

Streamed, an ``auto`` call is sent while it is written (``ToolStream(..., fragments=True)``):
its id and name as soon as the block's head ``{"name": "...", "arguments": {`` is complete,
then the arguments' text in fragments, holding back only what may be the block's closing
``}``. The fragments joined are the arguments exactly as the model wrote them, which is also
what the whole response carries (when the model writes the object's keys in another order,
or other keys after ``arguments``, the call is sent whole at its end, re-serialised).
Unlike the whole response, a block whose head has streamed stays a call even if it then
turns out not to be JSON, or is cut by the length limit: its arguments are what was sent
(vLLM's Hermes parser behaves the same).

Calls get ids ``call_`` + 24 hex digits. ``finish_reason`` becomes ``"tool_calls"`` when
``auto`` or ``required`` produced calls and generation stopped on its own (a call
``named`` by the request finishes with ``"stop"``, as OpenAI does).
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from typing import Any, Literal

CALL_OPEN = "<tool_call>"
CALL_CLOSE = "</tool_call>"
Mode = Literal["none", "auto", "required", "named"]
# the head of a Hermes call, up to its arguments object's opening brace
CALL_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"([a-zA-Z0-9_-]{1,64})"\s*,\s*"arguments"\s*:\s*(?=\{)')


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


@dataclass(frozen=True)
class CallStart:
    """A streamed call's head: its id and name (arguments follow as fragments)."""

    id: str
    name: str


@dataclass(frozen=True)
class ArgumentsFragment:
    """The next piece of the arguments of the call last started."""

    text: str


Event = str | ParsedCall | CallStart | ArgumentsFragment


def raw_arguments(block: str, arguments: dict[str, Any]) -> str | None:
    """The arguments' text as written in a Hermes block's JSON (``block``), if the block
    is ``{"name": ..., "arguments": {...}}`` in that order and nothing else; else ``None``."""
    head = CALL_HEAD.match(block)
    if head is None:
        return None
    rest = block[head.end() :].rstrip()
    if not rest.endswith("}"):
        return None
    raw = rest[:-1].rstrip()
    try:
        return raw if json.loads(raw) == arguments else None
    except ValueError:
        return None


def call_from_json(text: str, arguments_key: str = "arguments") -> ParsedCall | None:
    """A call from ``{"name": ..., <arguments_key>: {...}}``, or ``None`` if ``text`` is not
    that. Arguments keep the text the model wrote where it can be cut out (``raw_arguments``)."""
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
    written = raw_arguments(text, arguments) if arguments_key == "arguments" else None
    return ParsedCall(new_call_id(), value["name"], written or json.dumps(arguments, ensure_ascii=False))


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


@dataclass
class _OpenCall:
    """An ``auto`` call being streamed: where its arguments start in the block, and how
    much of them has been sent."""

    arguments_at: int
    sent: int = 0


class ToolStream:
    """Reads one choice's text delta by delta: ``feed`` and ``finish`` return, in order,
    content text (``str``) and calls: complete (``ParsedCall``) or, with ``fragments``
    for ``auto``, as ``CallStart`` then ``ArgumentsFragment`` pieces while the model
    writes them (see the module). ``auto`` holds back only text that may still open or
    continue a call block, so plain content streams at once. ``named`` calls are streamed
    by ``server.chat_format`` itself (``named_id``)."""

    def __init__(self, mode: ToolMode, *, fragments: bool = False) -> None:
        self.mode = mode
        self._fragments = fragments
        self._buffer = ""
        self._calls = 0
        self._open: _OpenCall | None = None
        self.named_call: ParsedCall | None = None

    def feed(self, text: str) -> list[Event]:
        if self.mode.mode == "none":
            return [text] if text else []
        self._buffer += text
        if self.mode.mode == "auto":
            return self._scan(final=False)
        return []

    def finish(self) -> list[Event]:
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

    def _scan(self, final: bool) -> list[Event]:
        events: list[Event] = []
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
                if self._open is not None or self._may_stream():
                    events += self._stream_open(self._buffer[len(CALL_OPEN) :], closed=False)
                if final and self._open is not None:  # cut off: the call stands as sent (see the module)
                    self._open = None
                    self._buffer = ""
                elif final:
                    events.append(self._take())
                break
            block = self._buffer[: end + len(CALL_CLOSE)]
            self._buffer = self._buffer[end + len(CALL_CLOSE) :]
            if self._open is not None:  # a streamed call: its last fragment
                events += self._stream_open(block[len(CALL_OPEN) : end], closed=True)
                self._open = None
                continue
            call = call_from_json(block[len(CALL_OPEN) : end].strip())
            if call is None:
                events.append(block)
            elif self.mode.parallel or self._calls == 0:
                self._calls += 1
                events.append(call)
        return events

    def _may_stream(self) -> bool:
        return self._fragments and (self.mode.parallel or self._calls == 0)

    def _stream_open(self, inner: str, *, closed: bool) -> list[Event]:
        """The events of the open block's text ``inner`` so far: its head once complete,
        then the arguments' text not sent yet, short of the last ``}`` (possibly the
        block's own) until the block is ``closed``. Nothing while the head is incomplete,
        or if it never comes (the block is then read whole)."""
        events: list[Event] = []
        if self._open is None:
            head = CALL_HEAD.match(inner)
            if head is None:
                return events
            self._open = _OpenCall(head.end())
            self._calls += 1
            events.append(CallStart(new_call_id(), head.group(1)))
        arguments = inner[self._open.arguments_at :]
        if closed:
            rest = arguments.rstrip()
            arguments = rest[:-1].rstrip() if rest.endswith("}") else arguments
        else:
            cut = arguments.rfind("}")
            arguments = arguments if cut < 0 else arguments[:cut]
        if len(arguments) > self._open.sent:
            events.append(ArgumentsFragment(arguments[self._open.sent :]))
            self._open.sent = len(arguments)
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
