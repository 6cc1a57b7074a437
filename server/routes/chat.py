"""``POST /v1/chat/completions``."""

from __future__ import annotations

from dataclasses import replace
from functools import partial

from quart import Blueprint, Response

from server.admission import hold_until_request_ends
from server.chat_format import ChatChunker, chat_completion
from server.generation import complete_jobs, make_jobs
from server.request_body import read_body
from server.request_id import current_request_id
from server.request_observer import current_record
from server.response_meta import ResponseMeta
from server.routes.common import check_model, json_response, serving_runtime
from server.sampling import LengthBudget, sampling_params
from server.schemas.chat import ChatCompletionRequest
from server.sse import sse_response
from server.state import current_state
from server.streaming import produce_chunks
from server.structured_output import output_grammar, tool_mode

blueprint = Blueprint("chat", __name__)


@blueprint.post("/v1/chat/completions")
async def chat_completions() -> Response:
    """Validate, build the output grammar if any (``server.structured_output``), prepare the
    prompt (images included), then generate ``n`` choices; tool calls are read back from
    the output (``server.tool_calls``).

    Cancellation (client gone): preparation is abandoned by the preparer's own rules and
    every engine sequence is aborted.
    """
    runtime = serving_runtime()
    body = await read_body(ChatCompletionRequest, current_state().parse_limiter)
    body.check_combinations()
    check_model(body.model, runtime)
    grammar = await output_grammar(body, current_state().grammars)
    prepared = await runtime.preparer.prepare_chat(body.chat())
    record = current_record()
    if record is not None:
        record.prep_measured(prepared.timings)
    if prepared.lease is not None:  # the image slots: held until submitted, at most until the request ends
        hold_until_request_ends(prepared.lease.release_creator)
    prompt = prepared.prompt
    requested, field = body.requested_max_tokens
    budget = LengthBudget(
        prompt_tokens=len(prompt.token_ids),
        max_model_len=runtime.max_model_len,
        requested=requested,
        field=field,
        default=runtime.sampling_defaults.max_tokens,
        prompt_param="messages",
    )
    params = sampling_params(
        body, max_tokens=budget.max_tokens(), logprobs=body.sampler_logprobs, defaults=runtime.sampling_defaults
    )
    if grammar is not None:
        params = [replace(p, grammar=grammar) for p in params]
    jobs = make_jobs([prompt], [params], prepared.lease)
    meta = ResponseMeta.new("chatcmpl", runtime.model_name)
    tools = tool_mode(body)
    if body.stream:
        chunker = ChatChunker(meta, include_usage=body.include_usage, logprobs=body.logprobs, tools=tools)
        producer = partial(produce_chunks, runtime.engine, jobs, chunker, body.include_usage, record=current_record())
        return sse_response(producer, current_request_id(), inline=len(jobs) == 1)
    results, usage = await complete_jobs(runtime.engine, jobs, current_record())
    return json_response(chat_completion(meta, results, usage, logprobs=body.logprobs, tools=tools))
