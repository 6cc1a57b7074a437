"""OpenAI-style error responses: ``{"error": {"message", "type", "param", "code"}}``.

Every failure a client can see goes through here, so no traceback or internal detail ever
reaches a response body: input errors from below (``vl.errors.InvalidRequest`` and its
subclasses) keep their message and parameter, HTTP-level errors (unknown route, wrong
method, body too large) get a short fixed message, anything else becomes a bare 500 and
is logged with its traceback on the server side only.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from types import MappingProxyType

from quart import Quart, Response, g, request
from werkzeug.exceptions import HTTPException

from engine.errors import RequestRejected, SamplingParamError
from vl.errors import InvalidRequest

log = logging.getLogger(__name__)

INVALID_REQUEST = "invalid_request_error"
SERVER_ERROR = "server_error"


class ApiError(Exception):
    """An error with a chosen HTTP status, rendered as OpenAI error JSON.

    ``headers`` are added to the response (``Retry-After`` for 503, ``WWW-Authenticate``
    for 401).
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = INVALID_REQUEST,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})


# Input errors of the request as a whole (those of its images are built in vl.errors) ---------


def model_not_found(model: str) -> ApiError:
    """404 for a ``model`` we do not serve."""
    return ApiError(
        404,
        f"The model `{model}` does not exist.",
        param="model",
        code="model_not_found",
    )


def unauthorized(message: str, code: str) -> ApiError:
    """401 for a missing or wrong API key."""
    return ApiError(401, message, code=code, headers={"WWW-Authenticate": "Bearer"})


def unavailable(message: str, code: str, retry_after_s: int) -> ApiError:
    """503 with ``Retry-After``: overloaded, still loading, or shutting down."""
    return ApiError(
        503,
        message,
        type=SERVER_ERROR,
        code=code,
        headers={"Retry-After": str(retry_after_s)},
    )


def empty_prompt(param: str) -> InvalidRequest:
    """400 for a prompt with no tokens; ``param`` names it (``messages``, ``prompt[1]``)."""
    return InvalidRequest("The prompt is empty.", param=param, code="empty_prompt")


def token_out_of_vocabulary(token_id: int, vocabulary: int, param: str) -> InvalidRequest:
    """400 for a token-id prompt with an id the tokenizer does not have."""
    return InvalidRequest(
        f"Token id {token_id} is out of vocabulary (this model's tokenizer has {vocabulary} tokens).",
        param=param,
        code="token_out_of_vocabulary",
    )


def prompt_too_long(max_model_len: int, prompt_tokens: int, param: str) -> InvalidRequest:
    """400 ``context_length_exceeded``: the prompt alone leaves no room to generate."""
    return InvalidRequest(
        f"This model's maximum context length is {max_model_len} tokens, "
        f"and the prompt alone has {prompt_tokens} tokens.",
        param=param,
        code="context_length_exceeded",
    )


def completion_too_long(max_model_len: int, prompt_tokens: int, requested: int, field: str) -> InvalidRequest:
    """400 ``context_length_exceeded``: prompt plus the requested completion (``field``) do
    not fit the context."""
    return InvalidRequest(
        f"This model's maximum context length is {max_model_len} tokens. "
        f"However, you requested {prompt_tokens + requested} tokens "
        f"({prompt_tokens} in the prompt, {requested} in the completion). "
        "Please reduce the length of the prompt or completion.",
        param=field,
        code="context_length_exceeded",
    )


def error_response(
    status: int,
    message: str,
    *,
    type: str = INVALID_REQUEST,
    param: str | None = None,
    code: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> Response:
    """The JSON response for one error. Never includes anything but the given fields."""
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    response = Response(json.dumps(body), status=status, content_type="application/json")
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


_HTTP_CODES = MappingProxyType(
    {
        400: ("We could not parse the body of your request.", "bad_request"),
        404: (None, "not_found"),
        405: (None, "method_not_allowed"),
        408: ("The request body took too long to arrive.", "request_timeout"),
        413: ("The request body is too large.", "request_too_large"),
    }
)


async def _handle_api_error(error: ApiError) -> Response:
    return error_response(
        error.status,
        error.message,
        type=error.type,
        param=error.param,
        code=error.code,
        headers=error.headers,
    )


# the request field (OpenAI's name) for each part of a request the engine may refuse
ENGINE_PARAMS = MappingProxyType({"prompt": "messages", "images": "messages", "logprobs": "top_logprobs"})


def invalid_request_from_engine(error: RequestRejected) -> InvalidRequest:
    """The client error for an engine refusal, naming the request field at fault."""
    param = ENGINE_PARAMS.get(error.subject, error.subject)
    if isinstance(error, SamplingParamError):
        return InvalidRequest(f"'{param}' {error.rule}.", param=param)
    return InvalidRequest(error.message, param=param, code=error.kind)


async def _handle_invalid_request(error: InvalidRequest) -> Response:
    return error_response(error.status, error.message, param=error.param, code=error.code)


async def _handle_engine_rejection(error: RequestRejected) -> Response:
    return await _handle_invalid_request(invalid_request_from_engine(error))


async def _handle_http_exception(error: HTTPException) -> Response:
    status = error.code or 500
    if status >= 500:
        return await _handle_unexpected(getattr(error, "original_exception", None) or error)
    message, code = _HTTP_CODES.get(status, (error.name, None))
    if status in (404, 405):
        message = f"Invalid URL ({request.method} {request.path})"
    headers = {name: value for name, value in error.get_headers() if name.lower() != "content-type"}
    return error_response(status, message or error.name, code=code, headers=headers)


async def _handle_unexpected(error: BaseException) -> Response:
    log.error(
        "unhandled error in %s %s (request %s)",
        request.method,
        request.path,
        g.get("request_id", "-"),
        exc_info=error,
    )
    return error_response(
        500,
        "The server had an error while processing your request.",
        type=SERVER_ERROR,
        code="internal_error",
    )


def install_error_handlers(app: Quart) -> None:
    """Register handlers so that every error a handler raises becomes OpenAI error JSON."""
    app.register_error_handler(ApiError, _handle_api_error)
    app.register_error_handler(InvalidRequest, _handle_invalid_request)
    app.register_error_handler(RequestRejected, _handle_engine_rejection)
    app.register_error_handler(HTTPException, _handle_http_exception)
    app.register_error_handler(Exception, _handle_unexpected)
