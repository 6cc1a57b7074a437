"""The default tool prompt, for chat templates that do not render tools themselves.

A template renders tools itself when its source uses the ``tools`` variable (Qwen2.5's,
Hermes', Llama 3.1's do); such a template gets the tools and the tool messages as they
are. For any other template, ``hermes_messages`` rewrites the chat in the Hermes/Qwen
convention before rendering, so the model sees the same text a Qwen2.5 template would
give it:

- the system message (one is added first if the chat has none) ends with ``TOOLS_HEADER``,
  the tools as JSON lines inside ``<tools></tools>``, and ``TOOLS_FOOTER``, which asks for
  each call as ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``;
- an assistant message's tool calls are appended to its text in that form;
- a ``tool`` message becomes a ``user`` message ``<tool_response>\\n...\\n</tool_response>``.

``server.tool_calls`` parses that output form back. Pure functions, no I/O.
"""

from __future__ import annotations

import json
from typing import Any

DEFAULT_SYSTEM = "You are a helpful assistant."
TOOLS_HEADER = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
TOOLS_FOOTER = (
    "</tools>\n\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
)


def template_renders_tools(chat_template: str) -> bool:
    """Whether a chat template's source uses the ``tools`` variable."""
    return "tools" in chat_template


def tools_block(tools: list[dict[str, Any]]) -> str:
    """The text appended to the system message: header, one JSON line per tool, footer."""
    lines = "".join("\n" + json.dumps(tool, ensure_ascii=False) for tool in tools)
    return f"{TOOLS_HEADER}{lines}\n{TOOLS_FOOTER}"


def hermes_messages(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """``messages`` (template form, ``vl.chat_messages``) rewritten for a template that
    knows only roles and text: tools in the system message, tool calls and tool results
    as text. Messages without tool content are passed unchanged."""
    out = [_plain(message) for message in messages]
    if tools:
        block = tools_block(tools)
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": _append_text(out[0]["content"], "\n\n" + block)}
        else:
            out.insert(0, {"role": "system", "content": f"{DEFAULT_SYSTEM}\n\n{block}"})
    return out


def _plain(message: dict[str, Any]) -> dict[str, Any]:
    if message["role"] == "tool":
        return {"role": "user", "content": _wrap(message["content"], "<tool_response>\n", "\n</tool_response>")}
    calls = message.get("tool_calls")
    if not calls:
        return {"role": message["role"], "content": message["content"]}
    text = "".join(
        "\n<tool_call>\n"
        + json.dumps({"name": c["function"]["name"], "arguments": c["function"]["arguments"]}, ensure_ascii=False)
        + "\n</tool_call>"
        for c in calls
    )
    content = message["content"]
    if not content:
        text = text.lstrip("\n")
    return {"role": message["role"], "content": _append_text(content, text)}


def _append_text(content: str | list[dict[str, Any]], text: str) -> str | list[dict[str, Any]]:
    if isinstance(content, str):
        return content + text
    return [*content, {"type": "text", "text": text}]


def _wrap(content: str | list[dict[str, Any]], before: str, after: str) -> str | list[dict[str, Any]]:
    if isinstance(content, str):
        return before + content + after
    return [{"type": "text", "text": before}, *content, {"type": "text", "text": after}]
