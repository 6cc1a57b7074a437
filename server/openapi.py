"""The OpenAPI 3.1 document of the served routes, generated from the pydantic schemas.

The one place that lists which request and response model each route takes: components
come from ``server.schemas`` through pydantic's JSON schema generation (so the document
cannot drift from what the server validates), and error responses share one
``ErrorResponse`` component in the shape ``server.errors`` builds.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from server.schemas.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionRequest
from server.schemas.completions import Completion, CompletionChunk, CompletionRequest
from server.schemas.models import ModelCard, ModelList
from server.schemas.tokenize import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeResponse,
)

OPENAPI_VERSION = "3.1.0"
REF = "#/components/schemas/{model}"

MODELS: tuple[type[BaseModel], ...] = (
    ChatCompletionRequest,
    ChatCompletion,
    ChatCompletionChunk,
    CompletionRequest,
    Completion,
    CompletionChunk,
    ModelList,
    ModelCard,
    TokenizeCompletionRequest,
    TokenizeChatRequest,
    TokenizeResponse,
    DetokenizeRequest,
    DetokenizeResponse,
)

ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}

PROBE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["status", "phase"],
    "properties": {"status": {"enum": ["ok", "unavailable"]}, "phase": {"type": "string"}},
}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": REF.format(model=name)}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*statuses: int) -> dict[str, Any]:
    return {str(status): _json(_ref("ErrorResponse"), "An OpenAI-style error.") for status in statuses}


WORK_ERRORS = (400, 401, 404, 413, 503)


def _generation(request: str, response: str, chunk: str, summary: str) -> dict[str, Any]:
    ok = _json(_ref(response), f"A whole {response} (``stream`` false).")
    ok["content"]["text/event-stream"] = {
        "schema": {"type": "string", "description": f"Server-sent events: one {chunk} JSON per event, then [DONE]."}
    }
    return {
        "post": {
            "summary": summary,
            "requestBody": {"required": True, "content": {"application/json": {"schema": _ref(request)}}},
            "responses": {"200": ok, **_errors(*WORK_ERRORS)},
        }
    }


def _post(request: dict[str, Any], response: str, summary: str) -> dict[str, Any]:
    return {
        "post": {
            "summary": summary,
            "requestBody": {"required": True, "content": {"application/json": {"schema": request}}},
            "responses": {"200": _json(_ref(response), response), **_errors(*WORK_ERRORS)},
        }
    }


def _probe(summary: str) -> dict[str, Any]:
    return {
        "get": {
            "summary": summary,
            "responses": {
                "200": _json(PROBE_SCHEMA, "Up (or ready)."),
                "503": _json(PROBE_SCHEMA, "Not up (or not ready)."),
            },
        }
    }


def openapi_document(title: str = "vlserve", version: str = "0") -> dict[str, Any]:
    """The whole OpenAPI document (a fresh dict; JSON-serialisable)."""
    _, components = models_json_schema([(model, "validation") for model in MODELS], ref_template=REF)
    schemas = dict(components.get("$defs", {}))
    schemas["ErrorResponse"] = ERROR_SCHEMA
    tokenize_body = {"oneOf": [_ref("TokenizeCompletionRequest"), _ref("TokenizeChatRequest")]}
    paths = {
        "/v1/chat/completions": _generation(
            "ChatCompletionRequest", "ChatCompletion", "ChatCompletionChunk", "Create a chat completion."
        ),
        "/v1/completions": _generation("CompletionRequest", "Completion", "CompletionChunk", "Create a completion."),
        "/v1/models": {
            "get": {
                "summary": "List the served model.",
                "responses": {"200": _json(_ref("ModelList"), "ModelList"), **_errors(401, 503)},
            }
        },
        "/v1/models/{model_id}": {
            "get": {
                "summary": "The served model's card.",
                "parameters": [{"name": "model_id", "in": "path", "required": True, "schema": {"type": "string"}}],
                "responses": {"200": _json(_ref("ModelCard"), "ModelCard"), **_errors(401, 404, 503)},
            }
        },
        "/tokenize": _post(tokenize_body, "TokenizeResponse", "Token ids of a prompt or a chat (vLLM's shape)."),
        "/detokenize": _post(_ref("DetokenizeRequest"), "DetokenizeResponse", "Text of token ids (vLLM's shape)."),
        "/health": _probe("Liveness."),
        "/ready": _probe("Readiness: 200 while new requests are served."),
        "/metrics": {
            "get": {
                "summary": "Prometheus text exposition.",
                "responses": {
                    "200": {"description": "Metrics.", "content": {"text/plain": {"schema": {"type": "string"}}}}
                },
            }
        },
        "/openapi.json": {
            "get": {
                "summary": "This document.",
                "responses": {"200": _json({"type": "object"}, "The OpenAPI document.")},
            }
        },
    }
    return {
        "openapi": OPENAPI_VERSION,
        "info": {"title": title, "version": version},
        "paths": paths,
        "components": {"schemas": schemas},
    }
