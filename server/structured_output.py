"""What a chat request's ``response_format`` and ``tool_choice`` ask the output to be: a
grammar for the engine's constrained decoding, and how to read the output back.

| request | grammar (JSON schema, compact) | output read as (``server.tool_calls``) |
|---|---|---|
| ``response_format: json_object`` | any JSON object | content |
| ``response_format: json_schema`` | ``json_schema.schema`` (``strict`` or not) | content |
| ``tool_choice: required`` | ``[{"name": <one of the tools>, "parameters": <its schema>}, ...]``: 1 to ``MAX_PARALLEL_CALLS`` items (1 if ``parallel_tool_calls`` is false) | tool calls |
| ``tool_choice: {"type": "function", ...}`` | the named function's ``parameters`` | one call of it |
| ``tool_choice: auto`` (default with tools) | none | Hermes ``<tool_call>`` blocks |
| ``tool_choice: none`` | none | content |

Grammars are llguidance grammar text (``LLMatcher.grammar_from_json_schema``) with
``whitespace_flexible`` off: no free whitespace between JSON tokens, so even a weak model
closes a small object well within its budget instead of filling it with spaces. For the
same reason a ``number`` without ``multipleOf`` gets ``multipleOf: 1e-6`` (at most six
fractional digits): otherwise a weak model can write digits until the length limit.
Every output still matches the schema as sent. The engine compiles the text again
against its tokenizer (``engine.grammar``).

``GrammarValidator`` builds and validates them off the event loop, in a worker thread
holding its gate (one token), and keeps the valid ones by schema text (at most
``CACHE_SIZE``, least recently used first out). A schema llguidance rejects is a 400
naming the field it came from.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from typing import Any

import llguidance
import trio

from server.schemas.chat import ChatCompletionRequest
from server.tool_calls import ToolMode
from vl.errors import InvalidRequest

CACHE_SIZE = 256
MAX_PARALLEL_CALLS = 8  # so a weak model cannot fill its budget with calls
ANY_OBJECT: dict[str, Any] = {"type": "object"}
COMPACT = {"whitespace_flexible": False}
NUMBER_STEP = 1e-6
LITERAL_KEYWORDS = frozenset({"enum", "const", "default", "examples"})  # values, not schemas


def bounded_numbers(schema: Any) -> Any:
    """``schema`` with ``multipleOf: NUMBER_STEP`` on every ``number`` schema that has no
    ``multipleOf`` (a copy; literal values under ``enum``/``const``/... are left alone)."""
    if isinstance(schema, list):
        return [bounded_numbers(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: v if k in LITERAL_KEYWORDS else bounded_numbers(v) for k, v in schema.items()}
    kind = out.get("type")
    if (kind == "number" or (isinstance(kind, list) and "number" in kind)) and "multipleOf" not in out:
        out["multipleOf"] = NUMBER_STEP
    return out


def build_grammar(schema_text: str, param: str) -> str:
    """The llguidance grammar of a JSON schema (numbers bounded, ``bounded_numbers``);
    ``InvalidRequest`` naming ``param`` if llguidance rejects the schema. Blocking (a
    worker thread's work)."""
    try:
        schema = bounded_numbers(json.loads(schema_text))
        grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=COMPACT)
        error = llguidance.LLMatcher.validate_grammar(grammar)
    except (ValueError, RuntimeError) as exc:
        error = str(exc)
    if error:
        raise InvalidRequest(f"Invalid JSON schema in '{param}': {error}", param=param)
    return grammar


class GrammarValidator:
    """Builds grammars off the event loop under a gate of one; caches them by schema."""

    def __init__(self) -> None:
        self.gate = trio.CapacityLimiter(1)
        self._cache: OrderedDict[str, str] = OrderedDict()

    async def grammar(self, schema: dict[str, Any], param: str) -> str:
        """The grammar of ``schema`` (see ``build_grammar``). Cancellation: a build that
        started finishes in its thread, which keeps the gate's token until it returns; a
        finished grammar may still enter the bounded cache, nothing else is left behind."""
        key = json.dumps(schema, sort_keys=True, ensure_ascii=False)
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            return cached
        grammar = await trio.to_thread.run_sync(build_grammar, key, param, limiter=self.gate)
        self._cache[key] = grammar
        while len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)
        return grammar


def output_schema(body: ChatCompletionRequest) -> tuple[dict[str, Any], str] | None:
    """The JSON schema the output must match and the request field it comes from, or
    ``None`` for free output (see the table above)."""
    mode = body.effective_tool_choice
    if mode == "required":
        tools = body.tools or []
        items = [
            {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "enum": [tool.function.name]},
                    "parameters": tool.function.parameters_schema,
                },
                "required": ["name", "parameters"],
                "additionalProperties": False,
            }
            for tool in tools
        ]
        most = 1 if body.parallel_tool_calls is False else MAX_PARALLEL_CALLS
        schema: dict[str, Any] = {"type": "array", "minItems": 1, "maxItems": most, "items": {"anyOf": items}}
        return schema, "tools"
    named = body.named_tool
    if named is not None:
        index = (body.tools or []).index(named)
        return named.function.parameters_schema, f"tools[{index}].function.parameters"
    response_format = body.response_format
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return ANY_OBJECT, "response_format"
    assert response_format.json_schema is not None  # the schema's validator guarantees it
    return response_format.json_schema.schema_ or {}, "response_format.json_schema.schema"


def tool_mode(body: ChatCompletionRequest) -> ToolMode:
    """How the output is read back (``server.tool_calls``)."""
    named = body.named_tool
    return ToolMode(
        body.effective_tool_choice if body.tools else "none",  # type: ignore[arg-type]
        named.function.name if named is not None else None,
        body.parallel_tool_calls is not False,
    )


async def output_grammar(body: ChatCompletionRequest, validator: GrammarValidator) -> str | None:
    """The grammar the request's output must match, or ``None``. Raises ``InvalidRequest``
    for a schema that cannot be compiled. Cancellation: as ``GrammarValidator.grammar``."""
    wanted = output_schema(body)
    if wanted is None:
        return None
    schema, param = wanted
    return await validator.grammar(schema, param)
