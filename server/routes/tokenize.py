"""``POST /tokenize`` and ``POST /detokenize``, in vLLM's request and response shapes."""

from __future__ import annotations

from typing import Any

from quart import Blueprint, Response

from server.request_body import read_body
from server.routes.common import check_model, json_response, serving_runtime
from server.schemas.tokenize import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeResponse,
)
from server.state import current_state

blueprint = Blueprint("tokenize", __name__)


def _tokenize_model(data: dict[str, Any]) -> type[TokenizeChatRequest | TokenizeCompletionRequest]:
    return TokenizeChatRequest if "messages" in data else TokenizeCompletionRequest


@blueprint.post("/tokenize")
async def tokenize() -> Response:
    """Token ids of a prompt, or of a chat rendered as the chat endpoint renders it.

    Cancellation: tokenizer work already started in the preparer's gated thread finishes
    there; the response is dropped.
    """
    runtime = serving_runtime()
    body = await read_body(_tokenize_model, current_state().parse_limiter)
    check_model(body.model, runtime)
    preparer = runtime.preparer
    if isinstance(body, TokenizeChatRequest):
        tokens = await preparer.tokenize_chat(body.chat())
    else:
        tokens = await preparer.tokenize(body.prompt, add_special_tokens=body.add_special_tokens)
    token_strs = None
    if body.return_token_strs:
        token_strs = [await preparer.detokenize([token]) for token in tokens]
    return json_response(
        TokenizeResponse(
            count=len(tokens),
            max_model_len=runtime.max_model_len,
            tokens=tokens,
            token_strs=token_strs,
        )
    )


@blueprint.post("/detokenize")
async def detokenize() -> Response:
    """The text of a list of token ids (ids outside the vocabulary are skipped)."""
    runtime = serving_runtime()
    body = await read_body(DetokenizeRequest, current_state().parse_limiter)
    check_model(body.model, runtime)
    text = await runtime.preparer.detokenize(body.tokens)
    return json_response(DetokenizeResponse(prompt=text))
